"""Which implementation a kernel call takes: ``triton`` on CUDA tensors, ``interpreter`` on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported, else ``reference``."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def active_backend(device: torch.device | str | None = None) -> str:
    """The path a kernel takes for tensors on ``device``: 'triton', 'interpreter' or 'reference'."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if not triton_available():
        return "reference"
    if dev.type == "cuda":
        return "triton"
    if interpreter_enabled():
        return "interpreter"
    return "reference"
