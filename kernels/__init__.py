"""Fused Triton kernels, installed as ``fastvader.kernels``.

The ops are plain functions::

    from fastvader.kernels import group_norm, temporal_attention
    y = group_norm(x, num_groups, weight, bias, eps, activation="silu")
    out = temporal_attention(q, k, v, heads, scale=None)

Each takes Triton on CUDA (and on the CPU under ``TRITON_INTERPRET=1``) and PyTorch elsewhere;
``active_backend(device)`` says which. One module per op in ``ops/``: the ``@triton.jit``
kernels, a launcher that checks shapes and picks block sizes, a ``torch.autograd.Function``,
a plain-PyTorch reference and the functional entry.
"""
if __name__ != "fastvader.kernels":
    # Reached as a top-level `kernels` because the repository root is on sys.path (`python -m`
    # from the checkout). transformers and diffusers probe for Hugging Face's own `kernels`
    # package by importing that name; a module with neither __file__ nor __version__ reads to
    # them as a namespace-package shadow, i.e. "not installed". Raising here instead would break
    # `import transformers`. fastvader/_compat.py covers the other order of imports.
    __file__ = None  # noqa: F811

from fastvader.kernels._backend import active_backend, triton_available

# Ops load on first use, so that importing fastvader.kernels does not import triton.
_LAZY = {
    "group_norm": "fastvader.kernels.ops.group_norm",
    "group_norm_reference": "fastvader.kernels.ops.group_norm",
    "group_norm_backend": "fastvader.kernels.ops.group_norm",
    "FusedGroupNormAct": "fastvader.kernels.ops.group_norm",
    "temporal_attention": "fastvader.kernels.ops.temporal_attention",
    "temporal_attention_reference": "fastvader.kernels.ops.temporal_attention",
    "temporal_attention_supports": "fastvader.kernels.ops.temporal_attention",
}
_RENAMED = {"group_norm_backend": "backend_for", "temporal_attention_supports": "kernel_supports"}

__all__ = ["active_backend", "triton_available", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
