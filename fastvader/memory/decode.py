"""Decode chosen frames through the VAE, with gradients only for the frames that need them.

(First version: per-frame AutoencoderKL. The memory-lean chunked version replaces it.)"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint


def _decode_images(vae, z: torch.Tensor) -> torch.Tensor:
    x = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1)


def decode_frames(vae, latents: torch.Tensor, frames: Sequence[int] | None = None,
                  grad_frames: Sequence[int] | None = None, chunk: int = 1) -> torch.Tensor:
    """latents (B, C, F, h, w) -> pixels (B, len(frames), 3, H, W) in [0, 1]."""
    B, C, F, h, w = latents.shape
    frames = list(range(F)) if frames is None else list(frames)
    grad_set = set(frames if grad_frames is None else grad_frames)
    out: list[torch.Tensor | None] = [None] * len(frames)
    for pos, f in enumerate(frames):
        z = latents[:, :, f]
        if f in grad_set and torch.is_grad_enabled():
            out[pos] = checkpoint(_decode_images, vae, z, use_reentrant=False)
        else:
            with torch.no_grad():
                out[pos] = _decode_images(vae, z.detach())
    return torch.stack(out, dim=1)  # type: ignore[arg-type]
