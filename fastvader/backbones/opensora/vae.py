"""Open-Sora 1.2's video VAE (``OpenSoraVAE_V1_2``) with the original parameter names.

Pixels (B, 3, T, H, W) -> per-frame SDXL VAE latents (x 0.18215) -> causal temporal VAE that
compresses time by 4 -> ``(z - shift) / scale``. Both stages run over chunks of
``micro_frame_size`` (17) frames, so 51 frames give 3 x 5 = 15 latent frames. Decoding reverses
it; each 17-frame chunk is rebuilt from 5 latent frames (the causal padding frames dropped).

``spatial_vae.module`` is a diffusers ``AutoencoderKL`` (fastvader's GroupNorm patches and
diffusers' own gradient checkpointing apply); the temporal VAE is fastvader's own module.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastvader.backbones.opensora.config import TemporalVAEConfig, VAEConfig


class CausalConv3d(nn.Module):
    """Conv3d padded only on the past side in time (and 'same' in space): frame t sees frames <= t."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size, stride=(1, 1, 1), bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        time_pad = (kt - 1) + (1 - stride[0])
        self.causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.causal_padding))


class TemporalResBlock(nn.Module):
    """GN-SiLU-conv3, GN-SiLU-conv3 (no biases), 1x1x1 conv shortcut when the width changes."""

    def __init__(self, chan_in: int, chan_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, chan_in)
        self.conv1 = CausalConv3d(chan_in, chan_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, chan_out)
        self.conv2 = CausalConv3d(chan_out, chan_out, 3, bias=False)
        if chan_in != chan_out:
            self.conv3 = CausalConv3d(chan_in, chan_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if hasattr(self, "conv3") else x)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g = cfg.filters, cfg.num_groups
        self.conv_in = CausalConv3d(cfg.in_out_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = f
        for i, mult in enumerate(cfg.channel_multipliers):
            width = f * mult
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(TemporalResBlock(prev, width, g))
                prev = width
            self.block_res_blocks.append(blocks)
            if i < len(cfg.channel_multipliers) - 1:
                # a stride-2-in-time conv where the level halves time; nothing otherwise
                self.conv_blocks.append(CausalConv3d(prev, width, 3, stride=(2, 1, 1))
                                        if cfg.temporal_downsample[i] else nn.Identity())
        self.res_blocks = nn.ModuleList([TemporalResBlock(prev, prev, g) for _ in range(cfg.num_res_blocks)])
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, cfg.latent_embed_dim * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g = cfg.filters, cfg.num_groups
        mults, down = cfg.channel_multipliers, cfg.temporal_downsample
        prev = f * mults[-1]
        self.temporal_downsample = list(down)
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, prev, 3)
        self.res_blocks = nn.ModuleList([TemporalResBlock(prev, prev, g) for _ in range(cfg.num_res_blocks)])
        blocks_rev, convs_rev = [], []
        for i in reversed(range(len(mults))):
            width = f * mults[i]
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(TemporalResBlock(prev, width, g))
                prev = width
            blocks_rev.append(blocks)
            if i > 0:
                # time upsampling by depth-to-time: the conv doubles the channels, then they are
                # unfolded into twice as many frames
                convs_rev.append(CausalConv3d(prev, prev * 2, 3) if down[i - 1] else nn.Identity())
        self.block_res_blocks = nn.ModuleList(blocks_rev[::-1])
        self.conv_blocks = nn.ModuleList(convs_rev[::-1])
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_downsample[i - 1]:
                    b, c2, t, h, w = x.shape  # "B (C ts) T H W -> B C (T ts) H W", ts = 2
                    x = x.view(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, t * 2, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """``VAE_Temporal``: encode pads time at the front to a multiple of 4; decode drops it."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def time_padding(self, num_frames: int) -> int:
        return (-num_frames) % self.config.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames + self.time_padding(num_frames)) // self.config.time_downsample_factor

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))[:, :, self.time_padding(num_frames):]


class SpatialVAE(nn.Module):
    """``VideoAutoencoderKL``: the SDXL AutoencoderKL frame by frame in micro-batches."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        self.module = AutoencoderKL(**cfg.spatial)
        self.scale = cfg.spatial_scale
        self.micro_batch_size = cfg.spatial_micro_batch_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 4, T, h, w)
        b, t = x.shape[0], x.shape[2]
        frames = x.transpose(1, 2).flatten(0, 1)
        z = torch.cat([self.module.encode(chunk).latent_dist.sample() * self.scale
                       for chunk in frames.split(self.micro_batch_size)])
        return z.view(b, t, *z.shape[1:]).transpose(1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, 4, T, h, w) -> (B, 3, T, H, W)
        b, t = z.shape[0], z.shape[2]
        frames = z.transpose(1, 2).flatten(0, 1) / self.scale
        x = torch.cat([self.module.decode(chunk).sample for chunk in frames.split(self.micro_batch_size)])
        return x.view(b, t, *x.shape[1:]).transpose(1, 2)


class OpenSoraVAE(nn.Module):
    """``VideoAutoencoderPipeline`` (state-dict names: ``scale``, ``shift``, ``spatial_vae.module.*``,
    ``temporal_vae.*``). ``decode`` returns pixels in [-1, 1]."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or VAEConfig()
        self.config = cfg
        self.spatial_vae = SpatialVAE(cfg)
        self.temporal_vae = TemporalVAE(cfg.temporal)
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(cfg.shift, dtype=torch.float32)[None, :, None, None, None])
        self.gradient_checkpointing = False

    @property
    def micro_latent_frames(self) -> int:
        return self.temporal_vae.latent_frames(self.config.micro_frame_size)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames`` video (chunks of micro_frame_size, each padded)."""
        m = self.config.micro_frame_size
        full, rest = divmod(num_frames, m)
        return full * self.micro_latent_frames + (self.temporal_vae.latent_frames(rest) if rest else 0)

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        z2d = self.spatial_vae.encode(x)
        m = self.config.micro_frame_size
        z = torch.cat([self.temporal_vae.encode(z2d[:, :, i:i + m], sample, generator)
                       for i in range(0, z2d.shape[2], m)], dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode_temporal(self, z: torch.Tensor, num_frames: int, frames: list[int]) -> dict[int, torch.Tensor]:
        """Only the temporal stage, only for the micro-chunks holding ``frames``:
        {frame: its 2D latent (B, 4, h, w)} (unnormalised, ready for the spatial decoder)."""
        self._check(z, num_frames)
        bad = [f for f in frames if not 0 <= f < num_frames]
        if bad:
            raise ValueError(f"frames {bad} are outside a {num_frames}-frame video")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        m, mz = self.config.micro_frame_size, self.micro_latent_frames
        out: dict[int, torch.Tensor] = {}
        for c in sorted({f // m for f in frames}):
            n = min(m, num_frames - c * m)
            chunk = z[:, :, c * mz:(c + 1) * mz]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                decoded = checkpoint(self.temporal_vae.decode, chunk, n, use_reentrant=False)
            else:
                decoded = self.temporal_vae.decode(chunk, n)
            for f in frames:
                if f // m == c:
                    out[f] = decoded[:, :, f - c * m]
        return out

    def _check(self, z: torch.Tensor, num_frames: int) -> None:
        if self.latent_frames(num_frames) != z.shape[2]:
            raise ValueError(f"{z.shape[2]} latent frames do not decode to {num_frames} frames "
                             f"({self.latent_frames(num_frames)} latent frames would)")

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, 4, T_lat, h, w) -> (B, 3, num_frames, H, W) in [-1, 1]."""
        self._check(z, num_frames)
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        m, mz = self.config.micro_frame_size, self.micro_latent_frames
        chunks, left = [], num_frames
        for i in range(0, z.shape[2], mz):
            n = min(m, left)
            chunk = z[:, :, i:i + mz]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                chunks.append(checkpoint(self.temporal_vae.decode, chunk, n, use_reentrant=False))
            else:
                chunks.append(self.temporal_vae.decode(chunk, n))
            left -= m
        return self.spatial_vae.decode(torch.cat(chunks, dim=2))
