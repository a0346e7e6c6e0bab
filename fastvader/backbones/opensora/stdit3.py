"""STDiT3 (Open-Sora 1.2's denoiser), written for fastvader with the original parameter names.

A stack of ``depth`` pairs of blocks on patch tokens (B, T*S, C): a *spatial* block attends
over the S patches of each frame, a *temporal* block over the T frames at each patch (with
rotary position embedding over time). Each block: adaLN-single modulated self-attention (qk
RMS-norm), cross-attention to the T5 caption tokens (padding masked), modulated GELU MLP.
Attention runs through ``F.scaled_dot_product_attention`` (the original uses flash-attn /
xformers kernels with the same math).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastvader.backbones.opensora.config import STDiT3Config


def _per_sample(value, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or one value per sample ({batch}); got {t.numel()} values")
    return t


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT timestep embedding, cos half first: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear (also the fps embedder: same layers, same math)."""

    def __init__(self, hidden: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features; ``y_embedding`` is the learned null caption used for guidance."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.y_proj = Mlp(cfg.caption_channels, cfg.hidden_size, cfg.hidden_size)
        self.register_buffer("y_embedding", torch.randn(cfg.model_max_length, cfg.caption_channels)
                             / cfg.caption_channels ** 0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: statistics in float32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """rotary_embedding_torch's RotaryEmbedding(dim) as the temporal blocks use it: interleaved
    pairs, ``freqs = 1 / 10000^(2i/dim)`` (an nn.Parameter in the original, so in the checkpoint)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.freqs = nn.Parameter(1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim),
                                  requires_grad=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., seq, dim): rotate along ``seq`` (dim -2)."""
        seq = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = torch.einsum("n,f->nf", seq, self.freqs.float()).repeat_interleave(2, dim=-1)
        pairs = x.float().unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    """Open-Sora's Attention: fused qkv, per-head RMS norm on q and k, optional rotary, SDPA."""

    def __init__(self, cfg: STDiT3Config, rope: RotaryEmbedding | None):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, cfg.hidden_size * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        # a plain attribute (not a submodule): the shared RotaryEmbedding lives on the model
        self.__dict__["rope"] = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope.rotate(q), self.rope.rotate(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Patch tokens attend to their own sample's caption tokens; padding tokens are masked
    (the original packs captions and uses a block-diagonal xformers mask: same result)."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_linear = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv_linear = nn.Linear(cfg.hidden_size, cfg.hidden_size * 2)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(b, cond.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class STDiT3Block(nn.Module):
    def __init__(self, cfg: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None):
        super().__init__()
        c = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(cfg, rope if temporal else None)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(c, int(c * cfg.mlp_ratio), c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c ** 0.5)

    def forward(self, x, y, t_mod, mask, num_frames: int, num_patches: int):
        b, _, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(b, 6, -1)).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = h.view(b, num_frames, num_patches, c)
        if self.temporal:  # one sequence of frames per patch
            h = h.transpose(1, 2).reshape(b * num_patches, num_frames, c)
            h = self.attn(h).view(b, num_patches, num_frames, c).transpose(1, 2)
        else:  # one sequence of patches per frame
            h = self.attn(h.reshape(b * num_frames, num_patches, c)).view(b, num_frames, num_patches, c)
        x = x + gate_msa * h.reshape(b, -1, c)
        x = x + self.cross_attn(x, y, mask)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: modulated LayerNorm, then a linear to patch pixels."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        c = cfg.hidden_size
        self.norm_final = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(c, math.prod(cfg.patch_size) * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class PatchEmbed3D(nn.Module):
    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.patch_size = tuple(cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        # pad up to whole patches (right/bottom/end), as the original
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T*H*W, C)


def position_embedding_2d(dim: int, h: int, w: int, scale: float, base_size: int, device) -> torch.Tensor:
    """Open-Sora's PositionEmbedding2D: sin/cos of the (scaled) row then column index, (1, h*w, dim)."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    grid_h = torch.arange(h, device=device) / scale * (base_size / h)
    grid_w = torch.arange(w, device=device) / scale * (base_size / w)
    rows = grid_h[:, None].expand(h, w).reshape(-1)
    cols = grid_w[None, :].expand(h, w).reshape(-1)

    def sincos(pos):
        out = torch.einsum("i,d->id", pos.float(), inv_freq)
        return torch.cat([out.sin(), out.cos()], dim=-1)

    # the original's meshgrid swaps names: its first half encodes the column, the second the row
    return torch.cat([sincos(cols), sincos(rows)], dim=-1)[None]


class STDiT3(nn.Module):
    """``forward(x (B, 4, T, H, W), timestep (B,) in [0, 1000], y (B, L, 4096), mask (B, L),
    fps (B,), height (B,), width (B,)) -> (B, 8, T, H, W)``: channels 0-3 are the rectified-flow
    velocity ``x0 - noise`` (Open-Sora's sign), 4-7 an unused variance head."""

    _supports_gradient_checkpointing = True

    def __init__(self, cfg: STDiT3Config | None = None):
        super().__init__()
        cfg = cfg or STDiT3Config()
        self.config = cfg
        c = cfg.hidden_size
        self.rope = RotaryEmbedding(cfg.head_dim)
        self.x_embedder = PatchEmbed3D(cfg)
        self.t_embedder = TimestepEmbedder(c, cfg.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(c, cfg.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(cfg, False, None) for _ in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(cfg, True, self.rope) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        """Spatial and temporal blocks in execution order: the units ``memory.checkpointing:
        block`` wraps. A view; the blocks stay registered under their checkpoint names."""
        return nn.ModuleList([b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair])

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                fps: torch.Tensor | float = 24, height: torch.Tensor | float | None = None,
                width: torch.Tensor | float | None = None) -> torch.Tensor:
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        b, _, tx, hx, wx = x.shape
        pt, ph, pw = cfg.patch_size
        t_p, h_p, w_p = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        num_patches = h_p * w_p
        # resolution-aware position embedding; height/width are the video's pixel size
        height = hx * 8 if height is None else height
        width = wx * 8 if width is None else width
        resolution = (float(torch.as_tensor(height).reshape(-1)[0]) * float(torch.as_tensor(width).reshape(-1)[0])) ** 0.5
        pos = position_embedding_2d(cfg.hidden_size, h_p, w_p, resolution / cfg.input_sq_size,
                                    round(num_patches ** 0.5), x.device).to(dtype)

        t = self.t_embedder(_per_sample(timestep, b, x.device)) + self.fps_embedder(_per_sample(fps, b, x.device))
        t_mod = self.t_block(t)
        y = self.y_embedder(y.to(dtype))

        tokens = self.x_embedder(x.to(dtype))  # (B, T*S, C)
        tokens = (tokens.view(b, t_p, num_patches, -1) + pos[:, None]).view(b, t_p * num_patches, -1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            for block in (spatial, temporal):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    tokens = checkpoint(block, tokens, y, t_mod, mask, t_p, num_patches, use_reentrant=False)
                else:
                    tokens = block(tokens, y, t_mod, mask, t_p, num_patches)
        out = self.final_layer(tokens, t)
        # (B, T*H*W, pt*ph*pw*C) -> (B, C, T*pt, H*ph, W*pw), cropped to the input size
        out = out.view(b, t_p, h_p, w_p, pt, ph, pw, cfg.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_channels, t_p * pt, h_p * ph, w_p * pw)
        return out[:, :, :tx, :hx, :wx].float()
