"""The LVDM 3D UNet of VideoCrafter2, written for fastvader.

Same computation and the same state-dict names as ``lvdm.modules.networks.openaimodel3d.UNetModel``
(so the released checkpoint loads strictly), built from parts the rest of fastvader knows:

- every transformer block is a diffusers ``BasicTransformerBlock`` (its ``attn1``/``attn2`` are
  diffusers ``Attention`` modules with ``to_q``/``to_k``/``to_v``/``to_out.0``, exactly the
  original's parameter names), so LoRA targets, attention processors and SDPA work as on any
  diffusers UNet;
- activations stay in the original's layout: ``(batch * frames, C, H, W)`` between blocks,
  ``(batch * H * W, frames, C)`` inside temporal attention.

Layout of one level (``input_blocks.N``): ``0`` LVDMResBlock (with ``temopral_conv`` — sic, the
original's spelling is part of the checkpoint), ``1`` SpatialTransformer (self-attention +
cross-attention to the text), ``2`` TemporalTransformer (two self-attentions over frames).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastvader.backbones.videocrafter2.config import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (the LDM convention): (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _per_sample(value, batch: int, device) -> torch.Tensor:
    """A scalar or (B,) timestep/fps -> a (B,) tensor."""
    t = torch.as_tensor(value, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected a scalar or one value per sample ({batch}); got shape {tuple(t.shape)}")
    return t


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype, as the original does (bf16
    statistics over 320x40x64 values lose precision). Still an ``nn.GroupNorm`` for patchers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d k=(3,1,1)) layers over frames, residual. The last
    conv starts at zero in the original, so a fresh block is the identity."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()

        def layer(with_dropout: bool) -> nn.Sequential:
            mods = [GroupNorm32(groups, channels), nn.SiLU()]
            if with_dropout:
                mods.append(nn.Dropout(dropout))
            mods.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*mods)

        self.conv1 = layer(False)
        self.conv2 = layer(True)
        self.conv3 = layer(True)
        self.conv4 = layer(True)
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class LVDMResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv, skip; then the temporal conv block."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        g = cfg.norm_groups
        self.in_layers = nn.Sequential(GroupNorm32(g, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(g, out_channels), nn.SiLU(), nn.Dropout(cfg.dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        if cfg.temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, g, cfg.temporal_conv_dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if hasattr(self, "temopral_conv"):
            bf, c, hh, ww = h.shape
            h = h.view(bf // num_frames, num_frames, c, hh, ww).transpose(1, 2)
            h = self.temopral_conv(h)
            h = h.transpose(1, 2).reshape(bf, c, hh, ww)
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _transformer_block(dim: int, heads: int, head_dim: int, context_dim: int | None):
    from diffusers.models.attention import BasicTransformerBlock

    # cross_attention_dim=None + double_self_attention: attn2 attends over the same tokens
    # (the original's temporal blocks, whose attn2 receives no context).
    return BasicTransformerBlock(dim, heads, head_dim, cross_attention_dim=context_dim,
                                 double_self_attention=context_dim is None, activation_fn="geglu",
                                 attention_bias=False, norm_type="layer_norm", norm_eps=1e-5)


class SpatialTransformer(nn.Module):
    """Per-frame image transformer: GN, proj_in, [self-attn, cross-attn(text), GEGLU FF], proj_out."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, cfg: UNetConfig):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [_transformer_block(inner, heads, head_dim, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (BF, C, H, W)
        bf, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (BF, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states=context)
        tokens = self.proj_out(tokens)
        return x + tokens.transpose(1, 2).reshape(bf, c, h, w)


class TemporalTransformer(nn.Module):
    """Attention over frames at each pixel: GN, proj_in, [self-attn, self-attn, GEGLU FF],
    proj_out. ``use_linear=False`` (only the UNet's ``init_attn``) projects with 1x1 Conv1d, as
    the original, whose weights are then 3-D."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, use_linear: bool, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear else (lambda i, o: nn.Conv1d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [_transformer_block(inner, heads, head_dim, None) for _ in range(depth)])
        self.proj_out = proj(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _project(self, layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_linear:
            return layer(tokens)
        return layer(tokens.transpose(1, 2)).transpose(1, 2)  # Conv1d over (N, C, T)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # (BF, C, H, W)
        bf, c, h, w = x.shape
        b = bf // num_frames
        # (B*F, C, H, W) -> (B*H*W, F, C): one sequence of frames per pixel
        tokens = self.norm(x).view(b, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, num_frames, c)
        tokens = self._project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self._project(self.proj_out, tokens)
        out = tokens.view(b, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return x + out


class UNetStage(nn.ModuleList):
    """One entry of ``input_blocks`` / ``middle_block`` / ``output_blocks``: runs its layers in
    order, giving each the inputs it takes (the original's TimestepEmbedSequential)."""

    gradient_checkpointing = False

    def forward(self, x, emb, context, num_frames):  # noqa: D401 - nn.Module API
        for layer in self:
            x = self._call(layer, x, emb, context, num_frames)
        return x

    def _call(self, layer, x, emb, context, num_frames):
        if isinstance(layer, LVDMResBlock):
            fn, args = layer, (x, emb, num_frames)
        elif isinstance(layer, SpatialTransformer):
            fn, args = layer, (x, context)
        elif isinstance(layer, TemporalTransformer):
            fn, args = layer, (x, num_frames)
        else:
            fn, args = layer, (x,)
        if self.gradient_checkpointing and torch.is_grad_enabled() and not isinstance(layer, (nn.Conv2d, Downsample)):
            # sub-block checkpointing: keep only each layer's input, recompute inside backward
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class LVDMUNet3D(nn.Module):
    """``forward(x (B, C, F, H, W), timesteps (B,), context (B, L, D), fps) -> (B, C, F, H, W)``."""

    _supports_gradient_checkpointing = True

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.config = cfg
        mc = cfg.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention_layers(ch: int) -> list[nn.Module]:
            heads, head_dim = ch // cfg.num_head_channels, cfg.num_head_channels
            layers: list[nn.Module] = [SpatialTransformer(ch, heads, head_dim, cfg.transformer_depth,
                                                          cfg.context_dim, cfg)]
            if cfg.temporal_attention:
                layers.append(TemporalTransformer(ch, heads, head_dim, cfg.temporal_transformer_depth,
                                                  cfg.use_linear, cfg.norm_groups))
            return layers

        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        if cfg.addition_attention:
            self.init_attn = UNetStage([TemporalTransformer(mc, cfg.init_attn_heads, cfg.num_head_channels,
                                                            cfg.transformer_depth, False, cfg.norm_groups)])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [LVDMResBlock(ch, emb_dim, mult * mc, cfg)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += attention_layers(ch)
                self.input_blocks.append(UNetStage(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetStage([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = UNetStage([LVDMResBlock(ch, emb_dim, ch, cfg), *attention_layers(ch),
                                       LVDMResBlock(ch, emb_dim, ch, cfg)])

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [LVDMResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers += attention_layers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetStage(layers))

        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def zero_initialized_layers(self) -> list[nn.Module]:
        """The layers the original starts at zero (so a fresh block is the identity): the last
        conv of each temporal conv block and resblock, each transformer's proj_out, the output conv."""
        layers: list[nn.Module] = [self.out[-1]]
        for m in self.modules():
            if isinstance(m, TemporalConvBlock):
                layers.append(m.conv4[-1])
            elif isinstance(m, LVDMResBlock):
                layers.append(m.out_layers[-1])
            elif isinstance(m, (SpatialTransformer, TemporalTransformer)):
                layers.append(m.proj_out)
        return layers

    def randomize_zero_initialized_layers(self) -> None:
        """Give those layers PyTorch's default random init: a random-weight model (benchmarks,
        tests) then computes, and backpropagates, through every block instead of through zeros."""
        for layer in self.zero_initialized_layers():
            layer.reset_parameters()

    # -- gradient checkpointing ---------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each LVDMResBlock / transformer in backward (sub-block checkpointing)."""
        self._set_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, UNetStage):
                m.gradient_checkpointing = on

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, UNetStage))

    @property
    def blocks(self) -> nn.ModuleList:
        """Every stage in execution order (input blocks, init_attn, middle, output blocks): the
        units ``memory.checkpointing: block`` wraps. A view; the stages stay registered where
        they are (and keep their checkpoint names)."""
        stages = [self.input_blocks[0]] + ([self.init_attn] if hasattr(self, "init_attn") else [])
        return nn.ModuleList(stages + list(self.input_blocks[1:]) + [self.middle_block] + list(self.output_blocks))

    @property
    def downsample_factor(self) -> int:
        """Latent height/width must be a multiple of this (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                fps: torch.Tensor | float | None = 16) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"LVDMUNet3D takes latents shaped (B, C, F, H, W); got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        m = self.downsample_factor
        if h % m or w % m:
            raise ValueError(f"latent size {h}x{w} must be a multiple of {m} (the UNet halves it "
                             f"{len(cfg.channel_mult) - 1} times)")
        param_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(_per_sample(timesteps, b, x.device), cfg.model_channels)
                              .to(param_dtype))
        if cfg.fps_cond:
            fps = _per_sample(16 if fps is None else fps, b, x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fps, cfg.model_channels).to(param_dtype))
        # every frame sees the same text and time embedding
        context = context.repeat_interleave(f, dim=0)
        emb = emb.repeat_interleave(f, dim=0)

        hidden = x.transpose(1, 2).reshape(b * f, x.shape[1], h, w)
        skips = []
        for i, stage in enumerate(self.input_blocks):
            hidden = stage(hidden, emb, context, f)
            if i == 0 and cfg.addition_attention:
                hidden = self.init_attn(hidden, emb, context, f)
            skips.append(hidden)
        hidden = self.middle_block(hidden, emb, context, f)
        for stage in self.output_blocks:
            hidden = stage(torch.cat([hidden, skips.pop()], dim=1), emb, context, f)
        out = self.out(hidden)
        return out.view(b, f, -1, h, w).transpose(1, 2)
