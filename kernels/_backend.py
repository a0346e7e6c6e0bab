"""Which implementation a kernel call takes: ``triton`` on CUDA tensors, ``interpreter`` on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported, else ``reference`` (the
plain-PyTorch path of :mod:`fastvader.kernels.reference`)."""
from __future__ import annotations

import importlib.util
import os

import torch

# Fixed for the process, and found without importing triton. A plain constant also lets
# torch.compile read it while tracing (a cached function would be traced through, with a warning).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """The Triton interpreter's switch; it must be set before triton is first imported."""
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
