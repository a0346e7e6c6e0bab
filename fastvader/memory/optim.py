"""Optimizers for the LoRA parameters: AdamW, bitsandbytes AdamW8bit and PagedAdamW8bit."""
from __future__ import annotations

import torch

from fastvader.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"optim.name={cfg.name!r} needs bitsandbytes: pip install 'fastvader[bnb]'") from err
    if cfg.name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    raise ValueError(f"optim.name={cfg.name!r}: choose adamw, adamw8bit or paged_adamw8bit")
