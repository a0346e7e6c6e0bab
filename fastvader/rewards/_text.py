"""Prompt tokenisation for the text-conditioned rewards (HPS, PickScore, CLIP score, ViCLIP).

Real weights come with the CLIP BPE tokenizer (``CLIPTokenizer``; open_clip's and ViCLIP's
``SimpleTokenizer`` use the same vocabulary and merges). Random-initialised models have no
tokenizer files: ``ByteTokenizer`` stands in (UTF-8 bytes folded into the vocabulary), enough to
run and benchmark the architecture; its scores mean nothing, as the weights mean nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from fastvader.rewards._hf import RewardWeightsError, is_local, transformers_module

BYTE_TOKENIZER_FILE = "fastvader_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class ByteTokenizer:
    """ids = [bos] + (utf-8 byte + 1) + [eos], padded with eos; bos/eos are the two largest ids,
    so the end-of-text token is also the largest id, as in CLIP."""

    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 259:
            raise ValueError(f"ByteTokenizer needs a vocabulary of at least 259 ids; got {vocab_size}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.bos_token_id = vocab_size - 2
        self.eos_token_id = vocab_size - 1

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in prompts:
            body = [b + 1 for b in text.lower().encode("utf-8")][: self.context_length - 2]
            ids = [self.bos_token_id] + body + [self.eos_token_id]
            rows.append(ids + [self.eos_token_id] * (self.context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder, BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"kind": "byte", "vocab_size": self.vocab_size, "context_length": self.context_length}))


class ClipBpeTokenizer:
    """A ``CLIPTokenizer`` padded/truncated to a fixed context (77 for CLIP, 32 for ViCLIP)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return out["input_ids"]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(folder))


def load_tokenizer(source: str | os.PathLike | None, *, reward: str, context_length: int,
                   vocab_size: int, random_init: bool, fallbacks: Sequence = ()):
    """The tokenizer named by ``reward.options.<reward>.tokenizer`` (a folder or hub id; errors
    if it is not there), else the first of ``fallbacks`` that holds one (the weights folder,
    then the reward's default hub id); a ByteTokenizer for random_init."""
    tried: list[str] = []
    for candidate in ([source] if source is not None else []) + [f for f in fallbacks if f is not None]:
        strict = candidate is source
        name = os.fspath(candidate)
        path = Path(os.path.expanduser(name))
        if path.is_dir() and (path / BYTE_TOKENIZER_FILE).is_file():
            meta = json.loads((path / BYTE_TOKENIZER_FILE).read_text())
            return ByteTokenizer(int(meta["vocab_size"]), int(meta["context_length"]))
        has_files = path.is_dir() and any((path / f).is_file() for f in HF_TOKENIZER_FILES)
        if (path.is_dir() and not has_files) or (not path.is_dir() and is_local(name)):
            if strict:
                raise RewardWeightsError(
                    f"reward {reward!r}: reward.options.{reward}.tokenizer={name!r} holds no tokenizer; "
                    f"expected a folder with {HF_TOKENIZER_FILES[0]} (or vocab.json + merges.txt), or a hub id")
            tried.append(f"{name} (no tokenizer files)")
            continue
        tf = transformers_module()
        try:
            tok = tf.CLIPTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            if strict:
                raise RewardWeightsError(
                    f"reward {reward!r}: could not load a CLIP tokenizer from {name!r}: {e}") from e
            tried.append(f"{name} ({type(e).__name__})")
            continue
        return ClipBpeTokenizer(tok, context_length)
    if random_init:
        return ByteTokenizer(vocab_size, context_length)
    raise RewardWeightsError(
        f"reward {reward!r}: no tokenizer found (tried {tried}); set reward.options.{reward}.tokenizer "
        f"to a local folder holding the CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt), "
        f"e.g. a download of openai/clip-vit-large-patch14")


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token per row (where CLIP pools its text embedding)."""
    is_eos = input_ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError("every tokenized prompt must contain the end-of-text token")
    return is_eos.int().argmax(dim=1)
