"""Route the temporal self-attention of diffusers video UNets through
:func:`fastvader.kernels.temporal_attention`.

Which modules: every diffusers ``Attention`` inside a ``TransformerTemporalModel``
(UNet3DConditionModel: its ``transformer_in`` and the ``temp_attentions`` of its blocks) or an
``AnimateDiffTransformer3D`` (UNetMotionModel's motion modules), and the ``attn1`` of each
``TemporalBasicTransformerBlock`` (SVD's UNetSpatioTemporalConditionModel). They are found by
type, not by name. Inside the first two, both ``attn1`` and ``attn2`` of each
``BasicTransformerBlock`` attend over frames (``double_self_attention``): hidden states arrive as
(batch x height x width, frames, channels), with the motion modules' sinusoidal positional
embedding already added by the block. SVD's temporal block reshapes to the same layout itself.

The processor calls the module's own ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` (so LoRA-wrapped
peft layers keep working and keep training), then the fused kernel in place of SDPA. Calls it
cannot serve (cross-attention with ``encoder_hidden_states``, 4-D inputs, a ``spatial_norm``,
more frames or wider heads than the kernel takes) go to the processor it replaced, with a
one-time warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn

from fastvader.kernels import active_backend, temporal_attention, temporal_attention_supports
from fastvader.patching.core import AttentionProcessor, Patches

__all__ = ["TemporalAttentionProcessor", "temporal_attention_modules", "apply_temporal_attention"]


def _temporal_transformer_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

        types.append(TransformerTemporalModel)
    except ImportError:  # pragma: no cover - older/newer diffusers layouts
        pass
    try:
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        types.append(AnimateDiffTransformer3D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _attention_type() -> type:
    from diffusers.models.attention_processor import Attention

    return Attention


def _temporal_block_type() -> type | None:
    """SVD's ``TemporalBasicTransformerBlock``: its ``attn1`` attends over frames; its ``attn2`` is
    cross-attention to the image embedding, and the spatial blocks beside it attend over pixels."""
    try:
        from diffusers.models.attention import TemporalBasicTransformerBlock
    except ImportError:  # pragma: no cover
        return None
    return TemporalBasicTransformerBlock


def temporal_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The diffusers ``Attention`` modules of ``model`` that attend over frames, in module order,
    each once (``model`` itself may be a temporal transformer)."""
    temporal_types = _temporal_transformer_types()
    block_type = _temporal_block_type()
    if not temporal_types and block_type is None:
        return []
    attention_type = _attention_type()
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if temporal_types and isinstance(module, temporal_types):
            candidates = list(module.modules())
        elif block_type is not None and isinstance(module, block_type):
            candidates = [module.attn1]
        else:
            continue
        for sub in candidates:
            if isinstance(sub, attention_type) and id(sub) not in seen:
                seen.add(id(sub))
                found.append(sub)
    return found


class TemporalAttentionProcessor:
    """diffusers attention processor: ``AttnProcessor2_0``'s semantics with the fused
    temporal-attention kernel in place of SDPA.

    ``fallback`` is the processor this one replaced; it serves the calls the kernel cannot.
    The score scale is ``attn.scale`` (head_dim ** -0.5 unless the module says otherwise).
    """

    def __init__(self, fallback: Callable | None = None):
        self.fallback = fallback

    def _why_not(self, attn, hidden_states, encoder_hidden_states) -> str | None:
        if encoder_hidden_states is not None:
            return "cross-attention (encoder_hidden_states given)"
        if hidden_states.ndim != 3:
            return f"{hidden_states.ndim}-D hidden states (expected (N, frames, channels))"
        if getattr(attn, "spatial_norm", None) is not None:
            return "spatial_norm"
        if active_backend(hidden_states.device) == "reference":
            return None  # the reference path takes anything
        inner = attn.to_q.out_features if hasattr(attn.to_q, "out_features") else hidden_states.shape[-1]
        probe = hidden_states.new_empty((0, hidden_states.shape[1], inner))
        return temporal_attention_supports(probe, attn.heads)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        why_not = self._why_not(attn, hidden_states, encoder_hidden_states)
        if why_not is not None:
            if self.fallback is None:
                raise ValueError(f"fastvader temporal attention cannot serve this call ({why_not}) "
                                 "and has no fallback processor")
            warnings.warn(f"fastvader temporal attention: {why_not}; this call uses the original "
                          f"processor {type(self.fallback).__name__}", stacklevel=2)
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)

        residual = hidden_states
        n_rows, frames, _ = hidden_states.shape

        bias = None
        if attention_mask is not None:
            # diffusers' additive mask, prepared to (N * heads, 1 or F, F), viewed per head.
            mask = attn.prepare_attention_mask(attention_mask, frames, n_rows)
            bias = mask.view(n_rows, attn.heads, -1, mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        if attn.norm_q is not None:  # per-head norms act on the last (head_dim) axis
            query = attn.norm_q(query.unflatten(-1, (heads, head_dim))).flatten(-2)
        if attn.norm_k is not None:
            key = attn.norm_k(key.unflatten(-1, (heads, head_dim))).flatten(-2)
        if not (query.dtype == key.dtype == value.dtype):  # e.g. an fp32 norm under autocast
            query, key = query.to(value.dtype), key.to(value.dtype)

        hidden_states = temporal_attention(query, key, value, heads, scale=attn.scale, bias=bias)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def apply_temporal_attention(model: nn.Module, patches: Patches | None = None) -> Patches:
    """Give every temporal attention module of ``model`` a :class:`TemporalAttentionProcessor`
    through ``patches`` (a new handle if None), which it returns: ``.revert()`` puts the exact
    previous processor objects back."""
    patches = Patches() if patches is None else patches
    for attn in temporal_attention_modules(model):
        previous = attn.processor
        if not isinstance(previous, TemporalAttentionProcessor):  # else already routed through the kernel
            patches.replace(AttentionProcessor(attn), TemporalAttentionProcessor(fallback=previous))
    return patches


def backend() -> str:
    """The implementation the patched attention runs on this machine's default device."""
    return active_backend(None)
