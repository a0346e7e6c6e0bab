"""Activation checkpointing for denoisers that do not offer it (diffusers 0.42's
UNet3DConditionModel refuses ``enable_gradient_checkpointing``).

``enable_checkpointing(model, policy)`` wraps the forward of each unit the policy names so that,
when gradients are on, only its inputs are kept and its inside is recomputed in backward
(the wrapper is a patch: :mod:`fastvader.patching.checkpoint`). It returns the wrappers' handle;
``revert()`` restores the model exactly. No-grad calls run the original forward untouched.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastvader.patching.checkpoint import CheckpointWrappers

# Sub-blocks: the residual, spatial-attention, temporal-conv and temporal-attention units of
# diffusers video UNets and DiTs (by class name, so unknown families just match nothing).
SUB_BLOCK_TYPES = (
    "ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel",
    "AnimateDiffTransformer3D", "TemporalBasicTransformerBlock", "SpatioTemporalResBlock", "WanTransformerBlock",
    "BasicTransformerBlock", "CogVideoXBlock",
    # fastvader's own VideoCrafter2 (LVDM) and Open-Sora modules
    "LVDMResBlock", "SpatialTransformer", "TemporalTransformer", "STDiT3Block",
)
BLOCK_ATTRS = ("down_blocks", "up_blocks", "mid_block", "blocks", "transformer_blocks")


def checkpoint_units(model: nn.Module, policy: str) -> list[nn.Module]:
    """The modules a policy wraps: ``sub_block`` (outermost matching sub-blocks), ``block``
    (top-level down/mid/up blocks or transformer blocks), ``none`` (nothing). ``step`` nests:
    the sampler's whole grad-step call is checkpointed (``step_checkpoint``) and, inside it,
    the sub-blocks are, so recomputing one step in backward keeps one step's sub-block inputs."""
    if policy == "none":
        return []
    if policy == "step":
        policy = "sub_block"
    if policy == "block":
        units: list[nn.Module] = []
        for attr in BLOCK_ATTRS:
            child = getattr(model, attr, None)
            if isinstance(child, nn.ModuleList):
                units.extend(child)
            elif isinstance(child, nn.Module):
                units.append(child)
        return units
    if policy == "sub_block":
        units, claimed = [], set()
        for name, module in model.named_modules():
            if type(module).__name__ in SUB_BLOCK_TYPES and not any(name.startswith(c + ".") for c in claimed):
                units.append(module)
                claimed.add(name)
        return units
    raise ValueError(f"memory.checkpointing={policy!r}: choose none, block, sub_block or step")


def enable_checkpointing(model: nn.Module, policy: str) -> CheckpointWrappers:
    """Wrap the policy's units in place; the handle counts their checkpointed calls and
    ``revert()`` unwraps them."""
    return CheckpointWrappers(checkpoint_units(model, policy))


def step_checkpoint(fn: Callable) -> Callable:
    """Per-denoising-step checkpointing: keep only the step's inputs (the latent), recompute
    the call in backward. Used as the sampler's ``grad_step_wrapper``."""

    @functools.wraps(fn)
    def wrapped(x, t):
        return checkpoint(fn, x, t, use_reentrant=False)

    return wrapped
