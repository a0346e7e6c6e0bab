"""Open-Sora 1.2's text encoder: T5 v1.1 XXL, 300 tokens, ``last_hidden_state`` + attention mask.

The encoder has 4.7B parameters (9.5 GB in bf16), more than the denoiser: it is loaded only
when prompts are encoded, used once per prompt set (the loop caches the embeddings), and
freed right after, so it never shares the GPU with training.
"""
from __future__ import annotations

import gc
import hashlib
from typing import Sequence

import torch

from fastvader.backbones.opensora.config import TextConfig


class HashT5Tokenizer:
    """Test stand-in with T5's conventions (pad 0, end-of-sequence 1, fixed length, mask)."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = vocab_size, max_length

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, text in enumerate(prompts):
            words = [2 + int(hashlib.sha1(w.encode()).hexdigest(), 16) % (self.vocab_size - 2)
                     for w in text.lower().split()][: self.max_length - 1] + [1]
            ids[row, : len(words)] = torch.tensor(words)
        return ids, (ids != 0).long()


class T5TextEncoder:
    """Loads T5 on demand, encodes, and (``free_after_encode``) drops it again. Not an
    nn.Module on purpose: moving or casting the backbone must not drag 4.7B parameters along."""

    def __init__(self, cfg: TextConfig, *, local_files_only: bool = False, free_after_encode: bool = True,
                 device: str | None = None, seed: int = 0):
        self.config = cfg
        self.local_files_only = local_files_only
        self.free_after_encode = free_after_encode
        self.device = device
        self.seed = seed
        self.model = None
        self.tokenizer = None

    @property
    def tiny(self) -> bool:
        return self.config.t5_config is not None

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import T5Config, T5EncoderModel

        if self.tiny:  # a random T5 of the given shape (tests, tiny models)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                self.model = T5EncoderModel(T5Config(**self.config.t5_config))
            self.tokenizer = HashT5Tokenizer(self.config.t5_config["vocab_size"], self.config.max_length)
        else:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.config.source,
                                                               local_files_only=self.local_files_only)
                self.model = T5EncoderModel.from_pretrained(self.config.source, torch_dtype=dtype,
                                                            local_files_only=self.local_files_only)
            except Exception as e:  # noqa: BLE001 - say what to change whatever failed
                raise FileNotFoundError(
                    f"opensora: could not load the T5 text encoder from {self.config.source!r} "
                    f"({type(e).__name__}: {e}). Set backbone.options.text_encoder to a local folder holding "
                    "a T5 v1.1 XXL encoder (config.json, weights, spiece.model).") from e
        self.model.requires_grad_(False).eval().to(device=device, dtype=dtype)

    def to(self, *args, **kwargs) -> "T5TextEncoder":
        """Move the loaded encoder (the loop moves text encoders off the GPU after caching)."""
        if self.model is not None:
            self.model.to(*args, **kwargs)
        return self

    def release(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.tokenizer, HashT5Tokenizer):
            return self.tokenizer(prompts)
        out = self.tokenizer(prompts, max_length=self.config.max_length, padding="max_length", truncation=True,
                             return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (B, max_length, d_model) features, (B, max_length) mask."""
        device = torch.device(self.device) if self.device else device
        if self.model is None:
            self.load(device, dtype)
        ids, mask = self._tokenize(list(prompts))
        try:
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        finally:
            if self.free_after_encode:
                self.release()
        return hidden, mask
