"""Fused Triton kernels, installed as ``fastvader.kernels``.

The ops are plain functions::

    from fastvader.kernels import group_norm, temporal_attention
    y = group_norm(x, num_groups, weight, bias, eps, activation="silu")
    out = temporal_attention(q, k, v, heads, scale=None)

Each is a torch custom op (``torch.ops.fastvader.*``, with fake implementations and autograd,
and an inference op taken when nothing needs gradients), so ``torch.compile(fullgraph=True)``
sees it as one node. It runs Triton on CUDA (and on the CPU under ``TRITON_INTERPRET=1``) and
plain PyTorch elsewhere; ``active_backend(device)`` says which, and ``kernel_impl()`` which
kernel generation the Triton path runs (``FASTVADER_KERNEL_IMPL``: v2, or the H200-measured v1).

Layout: ``ops/<op>.py`` (the ``@triton.jit`` kernels, launcher, op registration and entry;
``ops/<op>_v1.py`` the previous generation's kernels and launchers),
``reference.py`` (plain PyTorch: the float64 test oracles and the no-Triton path),
``modules.py`` (``FusedGroupNormAct``). Names load on first use, so that importing this package
does not import triton.
"""
if __name__ != "fastvader.kernels":
    # The one workaround for running from a checkout. With the repository root on sys.path
    # (`python -m ...` there, `python -m pytest`), `import kernels` finds this folder, and
    # transformers, diffusers and bitsandbytes probe for Hugging Face's own `kernels` package by
    # that very name. Imported so, this module stays empty and reads as a namespace-package
    # shadow (no __file__, no __version__, no submodules), which those probes take for "not
    # installed"; raising instead would break `import transformers`. fastvader itself only ever
    # imports `fastvader.kernels` (installed from this folder, see setup.py).
    __file__ = None  # noqa: F811
    __path__ = []
else:
    from fastvader.kernels._backend import active_backend, kernel_impl, triton_available

    _LAZY = {
        "group_norm": "fastvader.kernels.ops.group_norm",
        "group_norm_backend": "fastvader.kernels.ops.group_norm",
        "temporal_attention": "fastvader.kernels.ops.temporal_attention",
        "temporal_attention_supports": "fastvader.kernels.ops.temporal_attention",
        "group_norm_reference": "fastvader.kernels.reference",
        "temporal_attention_reference": "fastvader.kernels.reference",
        "FusedGroupNormAct": "fastvader.kernels.modules",
    }

    __all__ = ["active_backend", "kernel_impl", "triton_available", *_LAZY]

    def __getattr__(name: str):
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(_LAZY[name]), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
