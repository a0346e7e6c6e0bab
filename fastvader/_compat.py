"""Keeping the checkout's ``kernels/`` folder out of Hugging Face's way.

fastvader's Triton kernels live in ``kernels/`` at the repository root and install as
``fastvader.kernels``. When Python runs from the checkout (``python -m ...``), the root is on
sys.path and transformers, diffusers and bitsandbytes, which probe for Hugging Face's own
``kernels`` package by that name, would find our folder instead.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def hide_repo_kernels_package() -> None:
    """transformers 5 probes for Hugging Face's ``kernels`` package with ``find_spec`` and, when
    it finds one without install metadata, imports it. Marking the top-level name as absent
    (``sys.modules[name] = None`` makes ``find_spec`` answer None and ``import`` fail) fixes the
    probe without touching ``fastvader.kernels``. kernels/__init__.py covers the case where
    something imports ``kernels`` before fastvader is imported."""
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    repo_kernels = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    if Path(spec.origin).resolve() == repo_kernels:
        sys.modules["kernels"] = None  # type: ignore[assignment]
