"""Triton and ``triton.language`` when they import, else None: importing fastvader.kernels must
not require triton (without it every op takes the PyTorch path). The kernel modules take
``triton``, ``tl`` and ``HAS_TRITON`` from here."""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False
