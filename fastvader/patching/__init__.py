"""``fastvader.apply(model)`` swaps the hot ops of a live model for fused kernels and
``fastvader.revert(model)`` restores it exactly. One mechanism (core: :class:`Patches`) makes
and undoes every replacement: one module per patched op, and the activation-checkpoint wrapper
(checkpoint)."""
from fastvader.patching.core import (
    PATCHES,
    AttentionProcessor,
    ChildModule,
    InstanceAttr,
    ModuleClass,
    ModuleTensor,
    Patch,
    Patches,
    PatchReport,
    apply,
    available_patches,
    is_patched,
    revert,
)

__all__ = ["apply", "revert", "is_patched", "available_patches", "PatchReport", "Patch", "PATCHES",
           "Patches", "InstanceAttr", "ChildModule", "ModuleTensor",
           "ModuleClass", "AttentionProcessor"]
