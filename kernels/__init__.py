"""Fused Triton kernels, installed as ``fastvader.kernels``.

One file per op: the ``@triton.jit`` kernels, a launcher that checks shapes and picks block
sizes, a ``torch.autograd.Function``, a plain-PyTorch reference, and a functional entry point
that picks Triton on CUDA and the reference elsewhere (the Triton interpreter when
``TRITON_INTERPRET=1``).
"""
if __name__ != "fastvader.kernels":
    # Reached as a top-level `kernels` (the repository root on sys.path): pretend to be absent,
    # so probes for Hugging Face's `kernels` package (bitsandbytes, diffusers) see no such module.
    raise ModuleNotFoundError("fastvader's kernels/ is only importable as fastvader.kernels", name="kernels")

from ._backend import active_backend, triton_available

__all__ = ["active_backend", "triton_available", "temporal_attention", "temporal_attention_reference"]

# Ops load on first use, so that importing fastvader.kernels does not import triton. The
# function `temporal_attention` shares its name with its module: importing the submodule makes
# the package attribute the module, so the function is bound over it here, and the module itself
# is callable with the same signature (see the end of temporal_attention.py) for the case where
# the submodule was imported first.
_LAZY = {
    "temporal_attention": ".temporal_attention",
    "temporal_attention_reference": ".temporal_attention",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
