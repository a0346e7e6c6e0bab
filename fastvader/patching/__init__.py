"""``fastvader.apply(model)`` swaps the hot ops of a live model for fused kernels and
``fastvader.revert(model)`` restores it exactly (core); one module per patched op."""
from fastvader.patching.core import PATCHES, Patch, PatchReport, apply, available_patches, is_patched, register_patch, revert

__all__ = ["apply", "revert", "is_patched", "available_patches", "PatchReport", "Patch", "register_patch", "PATCHES"]
