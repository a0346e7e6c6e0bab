"""Fused Triton kernels, installed as ``fastvader.kernels``.

One file per op: the ``@triton.jit`` kernels, a launcher that checks shapes and picks block
sizes, a ``torch.autograd.Function``, a plain-PyTorch reference, and a functional entry point
that picks Triton on CUDA and the reference elsewhere (the Triton interpreter when
``TRITON_INTERPRET=1``).
"""
if __name__ != "fastvader.kernels":
    # Reached as a top-level `kernels` because the repository root is on sys.path (`python -m`
    # from the checkout). transformers and diffusers probe for Hugging Face's own `kernels`
    # package by importing that name; a module with neither __file__ nor __version__ reads to
    # them as a namespace-package shadow, i.e. "not installed". Raising here instead would break
    # `import transformers`.
    __file__ = None  # noqa: F811

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
