"""Fused Triton kernels, installed as ``fastvader.kernels``.

The ops are plain functions::

    from fastvader.kernels import group_norm, temporal_attention
    y = group_norm(x, num_groups, weight, bias, eps, activation="silu")
    out = temporal_attention(q, k, v, heads, scale=None)

Each is a torch custom op (``torch.ops.fastvader.*``, with fake implementations and autograd),
so ``torch.compile(fullgraph=True)`` sees it as one node. It runs Triton on CUDA (and on the CPU
under ``TRITON_INTERPRET=1``) and plain PyTorch elsewhere; ``active_backend(device)`` says which.

Layout: ``ops/<op>.py`` (the ``@triton.jit`` kernels, launcher, op registration and entry),
``reference.py`` (plain PyTorch: the float64 test oracles and the no-Triton path),
``modules.py`` (``FusedGroupNormAct``). Names load on first use, so that importing this package
does not import triton.
"""
if __name__ != "fastvader.kernels":
    # Reached as a top-level `kernels` because the repository root is on sys.path (`python -m`
    # from the checkout). transformers and diffusers probe for Hugging Face's own `kernels`
    # package by importing that name; a module with neither __file__ nor __version__ reads to
    # them as a namespace-package shadow, i.e. "not installed". Raising here instead would break
    # `import transformers`. fastvader/_compat.py covers the other order of imports.
    __file__ = None  # noqa: F811
else:
    from fastvader.kernels._backend import active_backend, triton_available

    _LAZY = {
        "group_norm": "fastvader.kernels.ops.group_norm",
        "group_norm_backend": "fastvader.kernels.ops.group_norm",
        "temporal_attention": "fastvader.kernels.ops.temporal_attention",
        "temporal_attention_supports": "fastvader.kernels.ops.temporal_attention",
        "group_norm_reference": "fastvader.kernels.reference",
        "temporal_attention_reference": "fastvader.kernels.reference",
        "FusedGroupNormAct": "fastvader.kernels.modules",
    }

    __all__ = ["active_backend", "triton_available", *_LAZY]

    def __getattr__(name: str):
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(_LAZY[name]), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
