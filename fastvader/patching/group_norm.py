"""The ``group_norm`` drop-in for ``fastvader.apply``: fused GroupNorm+SiLU in diffusers models.

What it replaces (through :class:`fastvader.patching.core.Patches`, which restores the exact
original objects):

- ``ResnetBlock2D`` (VAE and UNet) whose norms are ``nn.GroupNorm`` and nonlinearity ``nn.SiLU``:
  the block's ``forward`` is replaced, on the instance, by :func:`_fused_resnet_forward`, which
  is diffusers 0.42's ``ResnetBlock2D.forward`` with norm1+SiLU and norm2+SiLU fused. Swapping
  ``nonlinearity`` for ``nn.Identity`` instead would be wrong: the block also applies it to the
  time embedding. Blocks that already carry an instance-level ``forward`` (accelerate hooks)
  are left alone; fastvader's own checkpoint wrapper stays on top of the fused forward.
- UNet3D ``TemporalConvLayer``: in each of ``conv1..conv4`` (Sequential: GroupNorm, SiLU, ...),
  the GroupNorm becomes a ``FusedGroupNormAct(activation="silu")`` sharing its Parameters and
  the SiLU an ``nn.Identity``.
- ``conv_norm_out`` + ``conv_act`` of the VAE ``Encoder``/``Decoder`` and of
  ``UNet2DConditionModel``/``UNet3DConditionModel``: the same swap (their forwards apply the
  two back to back and nowhere else).
- ``Attention.group_norm`` (the VAE mid-block attention's input norm): a fused norm without
  activation.
- ``TemporalResnetBlock`` (SVD's UNet and VAE decoder, on (B, C, F, H, W)): its ``forward``, as
  ResnetBlock2D's, by :func:`_fused_temporal_resnet_forward`; ``conv_norm_out`` + ``conv_act`` of
  ``UNetSpatioTemporalConditionModel`` and of SVD's ``TemporalDecoder``.
- ``CogVideoXSpatialNorm3D.norm_layer`` (every norm of the CogVideoX VAE decoder: the GroupNorm
  whose output the latents modulate before the SiLU): a fused norm without activation. The
  encoder's norms (used without gradients, once per conditioning image) are left alone; the
  Wan VAE and the DiTs have no GroupNorm.

State-dict keys do not change (the fused module names its Parameters ``weight``/``bias`` and
shares the original ones), so checkpoints load either way and LoRA adapters are unaffected.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastvader.kernels import FusedGroupNormAct, group_norm, group_norm_backend
from fastvader.patching.core import MISSING, ChildModule, InstanceAttr, Patches

def _fused_norm(norm: nn.GroupNorm, x: torch.Tensor, activation):
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers ``ResnetBlock2D.forward`` (0.42) with each GroupNorm+SiLU pair as one fused op."""
    return _resnet_forward(self, input_tensor, temb, recompute_conv=False)


def _fused_resnet_forward_recompute(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args,
                                    **kwargs) -> torch.Tensor:
    """As :func:`_fused_resnet_forward`, and each norm-SiLU-conv run is checkpointed so that it
    keeps only its input: backward recomputes the (cheap, bandwidth-bound) norm+SiLU to feed
    the convolution's backward. Non-reentrant checkpointing stops recomputing as soon as the
    conv's saved input exists, so the convolution itself is not run again."""
    return _resnet_forward(self, input_tensor, temb, recompute_conv=True)


def _resnet_forward(self, input_tensor, temb, recompute_conv: bool):
    def norm1_act_conv1(x):
        h = _fused_norm(self.norm1, x, "silu")
        if self.upsample is not None:
            if h.shape[0] >= 64:  # diffusers: upsample_nearest_nhwc fails with large batches
                h = h.contiguous()
            h = self.upsample(h)
        elif self.downsample is not None:
            h = self.downsample(h)
        return self.conv1(h)

    def norm2_act_conv2(h):
        h = _fused_norm(self.norm2, h, "silu")
        h = self.dropout(h)
        return self.conv2(h)

    def run(fn, x):
        if recompute_conv and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    hidden_states = run(norm1_act_conv1, input_tensor)
    if self.upsample is not None:
        if input_tensor.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.upsample(input_tensor)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = _fused_norm(self.norm2, hidden_states, None)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = run(norm2_act_conv2, hidden_states)

    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    return (input_tensor + hidden_states) / self.output_scale_factor


def _fused_temporal_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args,
                                   **kwargs) -> torch.Tensor:
    """diffusers ``TemporalResnetBlock.forward`` (0.42: SVD's UNet and VAE decoder, on (B, C, F,
    H, W)) with each GroupNorm+SiLU pair as one fused op."""
    hidden_states = self.conv1(_fused_norm(self.norm1, input_tensor, "silu"))
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, :, None, None]
        hidden_states = hidden_states + temb.permute(0, 2, 1, 3, 4)
    hidden_states = self.conv2(self.dropout(_fused_norm(self.norm2, hidden_states, "silu")))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + hidden_states


def _fusable_forward(block: nn.Module, cls: type) -> InstanceAttr | None:
    """The ``forward`` slot of a ``cls`` block whose norm1/norm2 are GroupNorms and nonlinearity
    SiLU, running diffusers' own forward; None for any other block."""
    forward = InstanceAttr(block, "forward")
    if (type(block).forward is not cls.forward  # a subclass with its own forward
            # hooked by someone else (accelerate offload, ...) or already fused; fastvader's own
            # wrappers (activation checkpointing) stay on top of the fused forward
            or forward.base() is not MISSING
            # "ada_group"/"spatial" blocks carry other norm classes: left alone
            or type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm
            or type(block.nonlinearity) is not nn.SiLU):
        return None
    return forward


def _patch_resnet_block(patches: Patches, block: nn.Module, recompute_conv: bool) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    forward = _fusable_forward(block, ResnetBlock2D)
    if forward is not None:
        fused = _fused_resnet_forward_recompute if recompute_conv else _fused_resnet_forward
        patches.replace(forward, types.MethodType(fused, block))


def _patch_temporal_resnet_block(patches: Patches, block: nn.Module) -> None:
    from diffusers.models.resnet import TemporalResnetBlock

    forward = _fusable_forward(block, TemporalResnetBlock)
    if forward is not None:
        patches.replace(forward, types.MethodType(_fused_temporal_resnet_forward, block))


def _swap_pair(patches: Patches, parent: nn.Module, norm_key: str, act_key: str) -> None:
    """Replace ``parent.<norm_key>`` (GroupNorm) by a fused GroupNorm+SiLU and ``parent.<act_key>``
    (SiLU) by Identity; keys may be Sequential indices."""
    norm, act = parent._modules.get(norm_key), parent._modules.get(act_key)
    if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
        patches.replace(ChildModule(parent, norm_key), FusedGroupNormAct.from_group_norm(norm, "silu"))
        patches.replace(ChildModule(parent, act_key), nn.Identity())


def _swap_norm(patches: Patches, parent: nn.Module, norm_key: str) -> None:
    norm = parent._modules.get(norm_key)
    if type(norm) is nn.GroupNorm:
        patches.replace(ChildModule(parent, norm_key), FusedGroupNormAct.from_group_norm(norm, None))


def _conv_out_owner_types() -> tuple[type, ...]:
    """Classes whose forward applies ``conv_norm_out`` then ``conv_act`` back to back and uses
    ``conv_act`` nowhere else (checked against diffusers 0.42)."""
    from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel
    from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel

    return (Encoder, Decoder, TemporalDecoder, UNet2DConditionModel, UNet3DConditionModel,
            UNetSpatioTemporalConditionModel)


def apply_group_norm(model: nn.Module, patches: Patches | None = None, recompute_conv: bool = False) -> Patches:
    """Patch every supported GroupNorm(+SiLU) site in ``model`` through ``patches`` (a new handle
    if None), which it returns: ``.revert()`` restores the model exactly.

    ``recompute_conv``: in ResnetBlock2D, also checkpoint each norm-SiLU-conv run so that it
    keeps only its input for backward (the ``group_norm_conv`` op)."""
    patches = Patches() if patches is None else patches
    try:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXSpatialNorm3D
        from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer, TemporalResnetBlock
    except ImportError:  # no diffusers: nothing of ours to patch
        return patches
    conv_out_owners = _conv_out_owner_types()
    # Collect first: the swaps below change the module tree being walked.
    for module in list(model.modules()):
        if isinstance(module, ResnetBlock2D):
            _patch_resnet_block(patches, module, recompute_conv)
        elif isinstance(module, TemporalResnetBlock):
            _patch_temporal_resnet_block(patches, module)
        elif isinstance(module, CogVideoXSpatialNorm3D):  # its norm is modulated by the latents, then SiLU'd
            _swap_norm(patches, module, "norm_layer")
        elif isinstance(module, TemporalConvLayer):
            for name in ("conv1", "conv2", "conv3", "conv4"):
                seq = getattr(module, name, None)
                if isinstance(seq, nn.Sequential) and len(seq) >= 2:
                    _swap_pair(patches, seq, "0", "1")
        elif type(module) in conv_out_owners:
            _swap_pair(patches, module, "conv_norm_out", "conv_act")
        elif isinstance(module, Attention) and module._modules.get("group_norm") is not None:
            _swap_norm(patches, module, "group_norm")
    return patches


def apply_group_norm_conv(model: nn.Module, patches: Patches | None = None) -> Patches:
    """:func:`apply_group_norm` with ``recompute_conv``: the ``group_norm_conv`` op."""
    return apply_group_norm(model, patches, recompute_conv=True)


def backend() -> str:
    """The implementation the patched norms run on this machine's default device."""
    return group_norm_backend("cuda" if torch.cuda.is_available() else "cpu")
