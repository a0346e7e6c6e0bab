"""Devices and dtypes from config strings, in one place: ``auto`` means bf16 on a GPU and fp32 on
the CPU (CPU half-precision matmuls are slow and inexact)."""
from __future__ import annotations

import torch

from fastvader.config import ConfigError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(spec: str | torch.dtype, field: str = "dtype", device: torch.device | None = None) -> torch.dtype:
    """A dtype name (fp32, bf16, fp16 or auto) as a torch dtype; ``field`` names the config field
    in the error. ``auto`` follows ``device`` (default: whether CUDA is present)."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    if spec not in DTYPES:
        raise ValueError(f"{field}={spec!r} is invalid: choose auto, fp32, bf16 or fp16")
    return DTYPES[spec]


def resolve_device(spec: str) -> torch.device:
    """``train.device``: auto picks CUDA when present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config: train.device={spec!r} but no CUDA device is available (torch "
                          f"{torch.__version__} sees none): use --device cpu, or install a CUDA build of torch")
    return device
