"""Which implementation a kernel call takes: ``triton`` on CUDA tensors, ``interpreter`` on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported, else ``reference`` (the
plain-PyTorch path of :mod:`fastvader.kernels.reference`).

On the Triton paths, ``FASTVADER_KERNEL_IMPL`` picks the kernel generation: ``v2`` (default) or
``v1``, the kernels measured on an H200 before issue 15 (``ops/*_v1.py``), kept reachable until
the GPU suite has confirmed v2. ``FASTVADER_AUTOTUNE=0`` makes v2 take its heuristic launch
configuration instead of measuring candidates on first use of each shape key."""
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


KERNEL_IMPLS = ("v2", "v1")


def kernel_impl() -> str:
    """The Triton kernel generation for this call: $FASTVADER_KERNEL_IMPL, default 'v2'. Read at
    every call, so a benchmark can switch between generations in one process."""
    impl = os.environ.get("FASTVADER_KERNEL_IMPL", "v2").strip().lower() or "v2"
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"fastvader: FASTVADER_KERNEL_IMPL={impl!r} is invalid: choose one of {list(KERNEL_IMPLS)}")
    return impl


def autotune_enabled() -> bool:
    """Whether v2 launchers measure their candidate configurations ($FASTVADER_AUTOTUNE, default
    on); never under the interpreter, where one configuration is used."""
    return os.environ.get("FASTVADER_AUTOTUNE", "1").strip() != "0" and not interpreter_enabled()
