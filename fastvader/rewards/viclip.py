"""``viclip``: video-text alignment with ViCLIP-L/14 (OpenGVLab InternVideo / InternVid).

fastvader's own module, built from the config layout of
``reward_models/viclip_l14_config.json`` in fastvader.model_configs (``vision_encoder`` /
``text_encoder`` sections), with the parameter names of the published checkpoint
(``ViClip-InternVid-10M-FLT.pth``: ``{"model": {"vision_encoder.*", "text_encoder.*",
"temp"}}``) so it loads strictly, key for key. The vision tower is a CLIP ViT-L/14 applied to
8 frames at once: per-frame patch tokens get a learned temporal embedding and attend jointly
with one class token. score = scale * cosine(video embedding, prompt embedding).

Preprocessing follows the InternVid demo: 8 evenly spaced frames, resized straight to 224x224
(no crop), ImageNet mean/std.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.rewards._hf import (PretrainedReward, check_state_dict, find_weight_file,
                  load_state_dict_file, read_config, strip_private)
from fastvader.rewards._text import eos_positions, load_tokenizer
from fastvader.rewards.base import register_reward
from fastvader.rewards.preprocess import VICLIP_TRANSFORM, frames_to_images, sample_frames

CHECKPOINT_FILES = ("model.safetensors", "ViClip-InternVid-10M-FLT.pth")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block; parameter names as in the checkpoint (attn.in_proj_weight,
    mlp.c_fc, ...). nn.MultiheadAttention runs scaled-dot-product attention when weights are
    not requested."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class ViCLIPVision(nn.Module):
    def __init__(self, input_resolution: int = 224, patch_size: int = 14, width: int = 1024, layers: int = 24,
                 heads: int = 16, output_dim: int = 768, kernel_size: int = 1, num_frames: int = 8,
                 temp_embed: bool = True, mlp_ratio: float = 4.0, **_ignored: Any):
        super().__init__()
        self.num_frames = num_frames
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv3d(3, width, (kernel_size, patch_size, patch_size),
                               (kernel_size, patch_size, patch_size), bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, num_frames, width)) if temp_embed else None
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W), normalised -> (B, output_dim)."""
        x = self.conv1(video)  # (B, C, T', h, w)
        b, c, t, h, w = x.shape
        patches = x.permute(0, 2, 3, 4, 1).reshape(b, t, h * w, c) + self.positional_embedding[1:].to(x.dtype)
        if self.temporal_positional_embedding is not None:
            temporal = self.temporal_positional_embedding
            temporal = temporal.mean(1, keepdim=True) if t == 1 else temporal
            patches = patches + temporal.to(x.dtype)[:, :, None, :]  # (1, T, 1, C)
        # the original orders tokens (patch, frame): '(b n) t m -> b (n t) m'
        tokens = patches.permute(0, 2, 1, 3).reshape(b, h * w * t, c)
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype).expand(b, 1, c)
        x = self.ln_pre(torch.cat([cls, tokens], dim=1))
        x = self.ln_post(self.transformer(x))
        return x[:, 0] @ self.proj.to(x.dtype)


class ViCLIPText(nn.Module):
    def __init__(self, context_length: int = 32, vocab_size: int = 49408, transformer_width: int = 768,
                 transformer_heads: int = 12, transformer_layers: int = 12, embed_dim: int = 768, **_ignored: Any):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(transformer_width ** -0.5 * torch.randn(transformer_width, embed_dim))

    def forward(self, input_ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> (N, embed_dim), pooled at each row's end-of-text position ``eos`` (N,)."""
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.ln_final(self.transformer(x, causal))
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return pooled @ self.text_projection


class ViCLIPModel(nn.Module):
    """``vision_encoder`` + ``text_encoder`` + ``temp``: the published ViCLIP state-dict layout."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.vision_encoder = ViCLIPVision(**config["vision_encoder"])
        self.text_encoder = ViCLIPText(**config["text_encoder"])
        self.temp = nn.Parameter(torch.tensor(1 / 100.0))


def viclip_config(config: Any) -> dict:
    d = strip_private(read_config(config, "viclip"))
    if "vision_encoder" not in d or "text_encoder" not in d:
        raise ValueError("reward.options.viclip.config must have vision_encoder and text_encoder sections "
                         "(the layout of reward_models/viclip_l14_config.json in fastvader.model_configs)")
    d["vision_encoder"] = strip_private(d["vision_encoder"])
    d["text_encoder"] = strip_private(d["text_encoder"])
    return d


@register_reward
class ViCLIPReward(PretrainedReward):
    name = "viclip"
    kind = "video"
    is_video_reward = True
    default_pretrained = "OpenGVLab/ViCLIP"
    default_tokenizer = "openai/clip-vit-large-patch14"
    packaged_architectures = {"OpenGVLab/ViCLIP": "reward_models/viclip_l14_config.json"}
    expected_weights = ("ViClip-InternVid-10M-FLT.pth (hub repo OpenGVLab/ViCLIP; pretrained: the repo id, the "
                        "file, or a folder holding it; or a folder written by save_pretrained); CLIP BPE "
                        "tokenizer from openai/clip-vit-large-patch14 (tokenizer)")

    def __init__(self, pretrained: str = "OpenGVLab/ViCLIP", tokenizer: str | None = None, scale: float = 1.0,
                 checkpointing: bool = False, random_init: bool = False, config: Any = None,
                 dtype: str = "auto"):
        super().__init__(dtype)
        built_random = random_init
        if built_random:
            self.model = ViCLIPModel(viclip_config(self.architecture(config, pretrained)))
        else:
            self.model = self._load(pretrained, config)
        self.model.to(self.model_dtype)
        text = self.model.text_encoder
        folder = pretrained if not built_random and os.path.isdir(os.path.expanduser(pretrained)) else None
        self.tokenizer = load_tokenizer(tokenizer, reward=self.name, context_length=text.context_length,
                                        vocab_size=text.vocab_size, random_init=built_random,
                                        fallbacks=() if built_random else (folder, self.default_tokenizer))
        vision = self.model.vision_encoder
        size = vision.input_resolution
        self.transform = replace(VICLIP_TRANSFORM, size=(size, size))
        self.num_frames = vision.num_frames
        self.scale = float(scale)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        if checkpointing:
            self.enable_checkpointing()

    def checkpointed_layers(self):
        return list(self.model.vision_encoder.transformer.resblocks)

    def _load(self, pretrained: str, config: Any) -> ViCLIPModel:
        """The published .pth (architecture: ``config`` if given, else ViCLIP-L/14) or a folder
        written by save_pretrained (model.safetensors + its config.json)."""
        path = find_weight_file(pretrained, CHECKPOINT_FILES, reward=self.name, what="ViCLIP checkpoint")
        cfg_file = path.parent / "config.json"
        if config is None and path.suffix == ".safetensors" and cfg_file.is_file():
            config = cfg_file
        model = ViCLIPModel(viclip_config(self.architecture(config)))
        check_state_dict(model, load_state_dict_file(path, reward=self.name), reward=self.name, source=path)
        return model

    def _apply(self, fn, *args, **kwargs):
        self._prompt_cache = {}
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            device = self.model.temp.device
            ids = self.tokenizer(missing)
            # read on the CPU ids: no device sync, and possible on the meta device (the planner)
            eos = eos_positions(ids, self.tokenizer.eos_token_id).to(device)
            emb = F.normalize(self.model.text_encoder(ids.to(device), eos).float(), dim=-1)
            self._prompt_cache.update(zip(missing, emb))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def video_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        clip = sample_frames(videos.float(), self.num_frames)
        b, t = clip.shape[:2]
        pixels = self.transform(frames_to_images(clip)).view(b, t, 3, *self.transform.size)
        emb = self.model.vision_encoder(self.to_model(pixels.permute(0, 2, 1, 3, 4)))
        return F.normalize(emb.float(), dim=-1)

    def score_videos(self, videos, prompts):
        video = self.video_embeddings(videos)
        text = self.prompt_embeddings(prompts).to(video.device)
        return self.scale * (video * text).sum(-1)

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(Path(folder, CHECKPOINT_FILES[0])))
        Path(folder, "config.json").write_text(json.dumps(self.model.config, indent=2))
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def real_architecture(cls) -> nn.Module:
        return ViCLIPModel(viclip_config(cls.architecture()))
