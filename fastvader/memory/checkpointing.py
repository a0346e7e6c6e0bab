"""Activation checkpointing for denoisers that do not offer it (diffusers 0.42's
UNet3DConditionModel refuses ``enable_gradient_checkpointing``).

``enable_checkpointing(model, policy)`` wraps the forward of each unit the policy names so that,
when gradients are on, only its inputs are kept and its inside is recomputed in backward. It
returns an undo callable; no-grad calls run the original forward untouched.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# Sub-blocks: the residual, spatial-attention, temporal-conv and temporal-attention units of
# diffusers video UNets and DiTs (by class name, so unknown families just match nothing).
SUB_BLOCK_TYPES = (
    "ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel",
    "AnimateDiffTransformer3D", "TransformerSpatioTemporalModel", "WanTransformerBlock",
    "BasicTransformerBlock", "CogVideoXBlock",
    # fastvader's own VideoCrafter2 (LVDM) and Open-Sora modules
    "LVDMResBlock", "SpatialTransformer", "TemporalTransformer", "STDiT3Block",
)
BLOCK_ATTRS = ("down_blocks", "up_blocks", "mid_block", "blocks", "transformer_blocks")


def _wrap(module: nn.Module) -> Callable[[], None]:
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        import torch

        if torch.is_grad_enabled():
            forward.checkpoint_hits += 1  # read by the startup self-check (fastvader.monitoring.selfcheck)
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    forward.checkpoint_hits = 0  # type: ignore[attr-defined]
    module.forward = forward

    def undo():
        del module.forward  # the instance attribute goes; the class method shows through again

    return undo


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


def enable_checkpointing(model: nn.Module, policy: str) -> Callable[[], None]:
    """Wrap the policy's units in place; returns a callable that unwraps them."""
    undos = [_wrap(m) for m in checkpoint_units(model, policy)]

    def undo():
        for fn in reversed(undos):
            fn()

    undo.count = len(undos)  # type: ignore[attr-defined]
    return undo


def step_checkpoint(fn: Callable) -> Callable:
    """Per-denoising-step checkpointing: keep only the step's inputs (the latent), recompute
    the call in backward. Used as the sampler's ``grad_step_wrapper``."""

    @functools.wraps(fn)
    def wrapped(x, t):
        return checkpoint(fn, x, t, use_reentrant=False)

    return wrapped
