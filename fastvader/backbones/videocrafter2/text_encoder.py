"""VideoCrafter2's text encoder: the open_clip ViT-H-14 text tower, read at its penultimate layer.

``OpenCLIPTextEmbedder.model`` has the parameter names of open_clip's ``CLIP`` with ``visual``
deleted (what ``FrozenOpenCLIPEmbedder`` keeps), so ``cond_stage_model.model.*`` loads strictly:
all 24 residual blocks, ``text_projection`` and ``logit_scale`` are held although the penultimate
read-out uses neither the last block nor the projection (they are skipped at run time).

Tokens follow ``open_clip.tokenize``: ``<start> text <end>``, truncated to 77 with ``<end>``
kept last, padded with **0** (not with ``<end>`` as Hugging Face CLIP tokenizers pad). The
padding id matters: the causal transformer's outputs at padded positions feed cross-attention.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch
import torch.nn as nn

from fastvader.backbones.videocrafter2.config import TextConfig

SOT_TOKEN = 49406
EOT_TOKEN = 49407
#: where the CLIP BPE vocabulary comes from when the config names none (open_clip's tokenizer is
#: the OpenAI CLIP BPE; these hub repos ship it in transformers' format)
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio)
                                        for _ in range(cfg.layers)])


class OpenCLIPTextTower(nn.Module):
    """The text half of open_clip ``CLIP`` (same parameter names)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)
        if not self.positional_embedding.is_meta:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)
            self.logit_scale.data.fill_(torch.log(torch.tensor(1 / 0.07)).item())

    def build_attention_mask(self, device=None) -> torch.Tensor:
        """Causal additive mask: -inf above the diagonal."""
        n = self.config.context_length
        return torch.full((n, n), float("-inf"), device=device).triu_(1)

    def rebuild_buffers(self) -> None:
        """Recreate the non-persistent mask after loading weights into a module built on meta."""
        device = self.positional_embedding.device
        self.attn_mask = self.build_attention_mask(device)

    def forward(self, tokens: torch.Tensor, skip_last_layers: int = 1) -> torch.Tensor:
        """(B, 77) ids -> (B, 77, width): the output of block ``layers - skip_last_layers``
        through ``ln_final`` (``skip_last_layers=1`` is VideoCrafter2's "penultimate")."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        mask = self.attn_mask.to(x.dtype)
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - skip_last_layers]:
            x = block(x, mask)
        return self.ln_final(x)


class HashTokenizer:
    """A stand-in for tests and tiny models: words -> ids in [1, vocab - 2] by a stable hash,
    with the CLIP conventions (start, end, zero padding). Not a language model tokenizer."""

    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 4:
            raise ValueError("HashTokenizer needs a vocabulary of at least 4 ids")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.sot, self.eot = vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace(",", " ").split()
        return [1 + int(hashlib.sha1(w.encode()).hexdigest(), 16) % (self.vocab_size - 3) for w in words]


class CLIPBPETokenizer:
    """open_clip's tokenization through a transformers ``CLIPTokenizer`` (same BPE vocabulary),
    with open_clip's zero padding."""

    def __init__(self, source: str, context_length: int = 77, local_files_only: bool = False):
        from transformers import CLIPTokenizer

        try:
            self._tok = CLIPTokenizer.from_pretrained(source, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - name what to change whatever went wrong
            raise FileNotFoundError(
                f"videocrafter2: could not load the CLIP BPE tokenizer from {source!r} ({type(e).__name__}: {e}). "
                "Set backbone.options.tokenizer to a local folder holding vocab.json and merges.txt "
                f"(any OpenAI/open_clip CLIP tokenizer, e.g. a download of {DEFAULT_TOKENIZER}).") from e
        self.context_length = context_length
        self.sot, self.eot = SOT_TOKEN, EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False, truncation=False)["input_ids"]


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """open_clip.tokenize semantics over any tokenizer with ``encode``, ``sot``, ``eot``."""
    n = tokenizer.context_length
    out = torch.zeros(len(prompts), n, dtype=torch.long)
    for row, text in enumerate(prompts):
        ids = [tokenizer.sot] + tokenizer.encode(text) + [tokenizer.eot]
        if len(ids) > n:
            ids = ids[:n]
            ids[-1] = tokenizer.eot
        out[row, : len(ids)] = torch.tensor(ids)
    return out


class OpenCLIPTextEmbedder(nn.Module):
    """``FrozenOpenCLIPEmbedder``: prompts -> (B, 77, 1024) conditioning."""

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"text layer {cfg.layer!r}: choose penultimate or last")
        self.config = cfg
        self.model = OpenCLIPTextTower(cfg)
        self.tokenizer = tokenizer

    @property
    def skip_last_layers(self) -> int:
        return 1 if self.config.layer == "penultimate" else 0

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer; pass token ids to encode_tokens")
        return self.encode_tokens(tokenize(self.tokenizer, prompts))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.to(self.model.positional_embedding.device), self.skip_last_layers)


def make_tokenizer(cfg: TextConfig, source: str | None, tiny: bool, local_files_only: bool = False):
    """The hash stand-in for tiny models; otherwise the CLIP BPE from ``source`` (a folder or hub id)."""
    if tiny and source is None:
        return HashTokenizer(cfg.vocab_size, cfg.context_length)
    return CLIPBPETokenizer(os.path.expanduser(source or DEFAULT_TOKENIZER), cfg.context_length, local_files_only)
