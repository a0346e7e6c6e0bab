"""Fused GroupNorm (+ optional SiLU) with a memory-lean backward, as the torch op
``fastvader::group_norm_fwd`` / ``fastvader::group_norm_bwd``.

``group_norm(x, num_groups, weight, bias, eps, activation=None | "silu")`` normalises each
(sample, group) of ``x`` (shape (N, C, *spatial), any number of spatial dims) with fp32
statistics, applies the per-channel affine and, optionally, SiLU, in one kernel.

Why it exists: eager ``GroupNorm`` + ``SiLU`` keeps two full-size tensors for backward (the
norm's input and the SiLU's input) and runs at 15-20% of the bandwidth floor. Here forward keeps
only the input plus the per-group mean and rstd (N*G floats each); backward recomputes the
normalised and activated values from them: one pass reduces the two group sums the input
gradient needs (and per-channel partial sums for dweight/dbias), one pass writes dx.

Layout: the kernels address ``x`` through (sample, channel, spatial) strides, where the spatial
dims are merged into at most two runs (outer, inner). That covers contiguous, channels_last,
channels_last_3d and the frame-major permuted views diffusers' TemporalConvLayer feeds its
norms, without a copy; anything else is made contiguous first. Outputs shaped like ``x`` take
the strides the kernels read ``x`` with.

This file: the ``@triton.jit`` kernels, the launchers (checks and block sizes), the two custom
ops (their fake implementations for torch.compile, and the autograd formula linking them) and
the functional entry. Where Triton cannot run (CPU without TRITON_INTERPRET=1, or no triton),
the ops run the plain-PyTorch forward and backward of :mod:`fastvader.kernels.reference`. The
``FusedGroupNormAct`` module is in :mod:`fastvader.kernels.modules`; the diffusers drop-in in
``fastvader/patching/group_norm.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastvader.kernels import reference
from fastvader.kernels._backend import active_backend
from fastvader.kernels._checks import check_group_norm

try:  # importing fastvader.kernels must not require triton
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["group_norm", "group_norm_triton", "group_norm_backend"]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _tile(c_idx, s_idx, C_HI, S_HI, stride_c, stride_so, stride_si, S_INNER,
              C_FAST: tl.constexpr, SPLIT_S: tl.constexpr):
        """Offsets and mask of one tile: channels ``c_idx`` x flattened spatial ``s_idx``.

        The tile is laid out with the memory-contiguous axis last (C_FAST for channels_last),
        so the compiler's default order coalesces the loads.
        """
        if SPLIT_S:
            s_out = s_idx // S_INNER
            sp = s_out * stride_so + (s_idx - s_out * S_INNER) * stride_si
        else:
            sp = s_idx * stride_si
        c_ok = c_idx < C_HI
        s_ok = s_idx < S_HI
        if C_FAST:
            off = sp[:, None] + c_idx[None, :] * stride_c
            mask = s_ok[:, None] & c_ok[None, :]
        else:
            off = c_idx[:, None] * stride_c + sp[None, :]
            mask = c_ok[:, None] & s_ok[None, :]
        return off, mask

    @triton.jit
    def _per_channel(v, C_FAST: tl.constexpr):
        """Broadcast a per-channel vector against a tile."""
        if C_FAST:
            return v[None, :]
        else:
            return v[:, None]

    @triton.jit
    def _channel_sum(t, C_FAST: tl.constexpr):
        """Reduce a tile over its spatial axis, leaving one value per channel."""
        if C_FAST:
            return tl.sum(t, axis=0)
        else:
            return tl.sum(t, axis=1)

    @triton.jit
    def _zero_tile(BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr):
        if C_FAST:
            return tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        else:
            return tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)

    @triton.jit
    def _affine_params(W, B, channels, c_ok, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr):
        """fp32 weight and bias of a block of channels (1 and 0 for an op without them)."""
        if HAS_W:
            w = tl.load(W + channels, mask=c_ok, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_B:
            b = tl.load(B + channels, mask=c_ok, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK_C], tl.float32)
        return w, b

    @triton.jit
    def _group_stats(PARTIAL, pid, SPLIT, group_size, eps, BLOCK_SPLIT: tl.constexpr):
        """mean and rstd of one group from the SPLIT partial (shifted) sums of the stats pass."""
        k = tl.arange(0, BLOCK_SPLIT)
        k_ok = k < SPLIT
        base = PARTIAL + (pid * SPLIT + k) * 3
        s1 = tl.sum(tl.load(base, mask=k_ok, other=0.0), axis=0)
        s2 = tl.sum(tl.load(base + 1, mask=k_ok, other=0.0), axis=0)
        shift = tl.sum(tl.load(base + 2, mask=k < 1, other=0.0), axis=0)
        m1 = s1 / group_size
        var = tl.maximum(s2 / group_size - m1 * m1, 0.0)
        return shift + m1, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _gn_stats_kernel(
        X, PARTIAL,
        G, CPG, S, S_PER_SPLIT, SPLIT,
        stride_n, stride_c, stride_so, stride_si, S_INNER,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
    ):
        """Pass 1 of forward: partial sums of (x - shift) and (x - shift)^2 over one slice of
        one (sample, group). The shift (the group's first element, the same for every slice)
        keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        base = X + n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
        shift = tl.load(base).to(tl.float32)
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
        acc1 = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        acc2 = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        for c0 in range(0, CPG, BLOCK_C):
            c_idx = c0 + tl.arange(0, BLOCK_C)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_idx = s0 + tl.arange(0, BLOCK_S)
                off, mask = _tile(c_idx, s_idx, CPG, s_hi, stride_c, stride_so, stride_si,
                                  S_INNER, C_FAST, SPLIT_S)
                v = tl.load(base + off, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(mask, v - shift, 0.0)
                acc1 += v
                acc2 += v * v
        out = PARTIAL + (pid * SPLIT + split) * 3
        tl.store(out, tl.sum(tl.sum(acc1, axis=1), axis=0))
        tl.store(out + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))
        tl.store(out + 2, shift)

    @triton.jit
    def _gn_apply_kernel(
        X, Y, W, B, PARTIAL, MEAN, RSTD,
        G, CPG, S, S_PER_SPLIT, SPLIT, group_size, eps,
        stride_n, stride_c, stride_so, stride_si, S_INNER,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
        C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
    ):
        """Pass 2 of forward: y = act((x - mean) * rstd * w + b) over one slice of one group;
        the first slice also stores the group's mean and rstd for backward."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        mean, rstd = _group_stats(PARTIAL, pid, SPLIT, group_size, eps, BLOCK_SPLIT)
        if split == 0:
            tl.store(MEAN + pid, mean)
            tl.store(RSTD + pid, rstd)
        offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
        for c0 in range(0, CPG, BLOCK_C):
            c_idx = c0 + tl.arange(0, BLOCK_C)
            c_ok = c_idx < CPG
            w, b = _affine_params(W, B, g * CPG + c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
            scale = _per_channel(w * rstd, C_FAST)
            shift = _per_channel(b - mean * rstd * w, C_FAST)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_idx = s0 + tl.arange(0, BLOCK_S)
                off, mask = _tile(c_idx, s_idx, CPG, s_hi, stride_c, stride_so, stride_si,
                                  S_INNER, C_FAST, SPLIT_S)
                v = tl.load(X + offset + off, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(mask, v, mean)  # keeps masked lanes finite (no exp overflow)
                z = v * scale + shift
                if SILU:
                    z = z * tl.sigmoid(z)
                tl.store(Y + offset + off, z.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _recompute_grad(v, dy, mean, rstd, w_t, b_t, SILU: tl.constexpr):
        """From a tile of input and output gradient: x_hat and dL/d(pre-activation)."""
        x_hat = (v - mean) * rstd
        g = dy
        if SILU:
            z = x_hat * w_t + b_t
            sig = tl.sigmoid(z)
            g = dy * sig * (1.0 + z * (1.0 - sig))
        return x_hat, g

    @triton.jit
    def _gn_bwd_reduce_kernel(
        X, DY, W, B, MEAN, RSTD, PARTIAL, DW_PART, DB_PART,
        C, G, CPG, S, S_PER_SPLIT, SPLIT,
        stride_n, stride_c, stride_so, stride_si, S_INNER,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
    ):
        """Backward pass 1 over one slice of one group: the group sums of dx_hat and
        dx_hat * x_hat (for dx), and per-channel partial sums of g * x_hat and g (dweight,
        dbias), written per (sample, slice) row and summed by the launcher."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
        offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
        acc_a = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        acc_b = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        row = (n * SPLIT + split).to(tl.int64) * C + g * CPG
        for c0 in range(0, CPG, BLOCK_C):
            c_idx = c0 + tl.arange(0, BLOCK_C)
            c_ok = c_idx < CPG
            w, b = _affine_params(W, B, g * CPG + c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
            w_t = _per_channel(w, C_FAST)
            b_t = _per_channel(b, C_FAST)
            acc_dw = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
            acc_db = _zero_tile(BLOCK_C, BLOCK_S, C_FAST)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_idx = s0 + tl.arange(0, BLOCK_S)
                off, mask = _tile(c_idx, s_idx, CPG, s_hi, stride_c, stride_so, stride_si,
                                  S_INNER, C_FAST, SPLIT_S)
                v = tl.load(X + offset + off, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(mask, v, mean)  # keeps masked lanes finite (no exp overflow)
                dy = tl.load(DY + offset + off, mask=mask, other=0.0).to(tl.float32)
                x_hat, gr = _recompute_grad(v, dy, mean, rstd, w_t, b_t, SILU)
                x_hat = tl.where(mask, x_hat, 0.0)
                gr = tl.where(mask, gr, 0.0)
                dx_hat = gr * w_t
                acc_a += dx_hat
                acc_b += dx_hat * x_hat
                acc_dw += gr * x_hat
                acc_db += gr
            tl.store(DW_PART + row + c_idx, _channel_sum(acc_dw, C_FAST), mask=c_ok)
            tl.store(DB_PART + row + c_idx, _channel_sum(acc_db, C_FAST), mask=c_ok)
        out = PARTIAL + (pid * SPLIT + split) * 2
        tl.store(out, tl.sum(tl.sum(acc_a, axis=1), axis=0))
        tl.store(out + 1, tl.sum(tl.sum(acc_b, axis=1), axis=0))

    @triton.jit
    def _gn_bwd_dx_kernel(
        X, DY, DX, W, B, MEAN, RSTD, PARTIAL,
        G, CPG, S, S_PER_SPLIT, SPLIT, group_size,
        stride_n, stride_c, stride_so, stride_si, S_INNER,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
        C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
    ):
        """Backward pass 2: dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
        k = tl.arange(0, BLOCK_SPLIT)
        k_ok = k < SPLIT
        part = PARTIAL + (pid * SPLIT + k) * 2
        c1 = tl.sum(tl.load(part, mask=k_ok, other=0.0), axis=0) / group_size
        c2 = tl.sum(tl.load(part + 1, mask=k_ok, other=0.0), axis=0) / group_size
        offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
        s_lo = split * S_PER_SPLIT
        s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
        for c0 in range(0, CPG, BLOCK_C):
            c_idx = c0 + tl.arange(0, BLOCK_C)
            c_ok = c_idx < CPG
            w, b = _affine_params(W, B, g * CPG + c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
            w_t = _per_channel(w, C_FAST)
            b_t = _per_channel(b, C_FAST)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_idx = s0 + tl.arange(0, BLOCK_S)
                off, mask = _tile(c_idx, s_idx, CPG, s_hi, stride_c, stride_so, stride_si,
                                  S_INNER, C_FAST, SPLIT_S)
                v = tl.load(X + offset + off, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(mask, v, mean)  # keeps masked lanes finite (no exp overflow)
                dy = tl.load(DY + offset + off, mask=mask, other=0.0).to(tl.float32)
                x_hat, gr = _recompute_grad(v, dy, mean, rstd, w_t, b_t, SILU)
                dx = rstd * (gr * w_t - c1 - x_hat * c2)
                tl.store(DX + offset + off, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


class _Layout:
    """How the kernels address an (N, C, *spatial) tensor: strides of the sample and channel
    dims, and the spatial dims merged into an (outer, inner) pair of runs."""

    def __init__(self, x: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        self.stride_n, self.stride_c = x.stride(0), x.stride(1)
        runs = _merge_runs(list(x.shape[2:]), list(x.stride()[2:]))
        if len(runs) > 2:
            raise ValueError("spatial dims do not merge into two strided runs")
        if not runs:
            runs = [(1, 1)]
        if len(runs) == 1:
            runs = [(1, 0)] + runs
        (self.S_outer, self.stride_so), (self.S_inner, self.stride_si) = runs
        self.split_s = self.S_outer > 1
        # The memory-contiguous axis decides the tile orientation (coalesced loads).
        self.c_fast = self.stride_c == 1 and self.C > 1 and self.stride_si != 1


def _merge_runs(sizes: list[int], strides: list[int]) -> list[tuple[int, int]]:
    """Merge adjacent dims whose strides chain, dropping size-1 dims: [(size, stride), ...]."""
    runs: list[tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if runs and runs[-1][1] == stride * size:
            prev_size, _ = runs[-1]
            runs[-1] = (prev_size * size, stride)
        else:
            runs.append((size, stride))
    return runs


def _addressable_in_place(x: torch.Tensor) -> bool:
    """True when the kernels can address ``x`` itself and its elements fill its storage span
    exactly once (some permutation of a contiguous tensor), so an output can share its strides."""
    try:
        _Layout(x)
    except ValueError:
        return False
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides the kernels read ``x`` with, which every x-shaped output of the ops takes:
    x's own, or contiguous ones when x must be copied first."""
    if _addressable_in_place(x):
        return tuple(x.stride())
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _with_strides(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.stride()) == tuple(strides):
        return t
    out = t.new_empty_strided(t.shape, strides)
    out.copy_(t)
    return out


def _config(layout: _Layout, groups: int, device: torch.device, tile: Optional[int],
            split: Optional[int]):
    """Block sizes and the number of slices each group is cut into.

    Triton on a GPU: ~4096-element tiles and enough slices to give every SM a few programs.
    The interpreter pays ~2 ms per program and little per element, so it takes big tiles and
    one slice per group unless told otherwise.
    """
    cpg = layout.C // groups
    on_gpu = device.type == "cuda"
    tile = tile or (4096 if on_gpu else 16384)
    block_c = min(_next_pow2(cpg), 64 if on_gpu else 256, _next_pow2(tile))
    block_s = max(1, min(_next_pow2(layout.S), tile // block_c))
    s_blocks = triton.cdiv(layout.S, block_s)
    if split is None:
        if on_gpu:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split = max(1, min(s_blocks, triton.cdiv(4 * sms, layout.N * groups)))
        else:
            split = 1
    split = max(1, min(int(split), s_blocks))
    s_per_split = triton.cdiv(s_blocks, split) * block_s
    split = triton.cdiv(layout.S, s_per_split)
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return dict(cpg=cpg, block_c=block_c, block_s=block_s, split=split,
                s_per_split=s_per_split, block_split=_next_pow2(split), num_warps=num_warps)


def _forward_launch(x, num_groups, weight, bias, eps, activation, tile=None, split=None):
    """Run the forward kernels; returns (y, mean, rstd) with y in the kernel strides and x's
    dtype, and mean/rstd as fp32 (N*G,)."""
    x = _with_strides(x, _kernel_strides(x))
    lay = _Layout(x)
    cfg = _config(lay, num_groups, x.device, tile, split)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    rows = lay.N * num_groups
    partial = torch.empty(rows * cfg["split"] * 3, dtype=torch.float32, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean, rstd
    grid = (rows, cfg["split"])
    strides = (lay.stride_n, lay.stride_c, lay.stride_so, lay.stride_si, lay.S_inner)
    _gn_stats_kernel[grid](
        x, partial, num_groups, cfg["cpg"], lay.S, cfg["s_per_split"], cfg["split"], *strides,
        BLOCK_C=cfg["block_c"], BLOCK_S=cfg["block_s"], C_FAST=lay.c_fast,
        SPLIT_S=lay.split_s, num_warps=cfg["num_warps"],
    )
    _gn_apply_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        partial, mean, rstd,
        num_groups, cfg["cpg"], lay.S, cfg["s_per_split"], cfg["split"],
        float(cfg["cpg"] * lay.S), float(eps), *strides,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=activation == "silu",
        BLOCK_C=cfg["block_c"], BLOCK_S=cfg["block_s"], BLOCK_SPLIT=cfg["block_split"],
        C_FAST=lay.c_fast, SPLIT_S=lay.split_s, num_warps=cfg["num_warps"],
    )
    return y, mean, rstd


def _backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation,
                     tile=None, split=None):
    """Run the backward kernels; returns (dx, dweight, dbias), the last two as fp32 sums."""
    x = _with_strides(x, _kernel_strides(x))
    dy = _with_strides(dy, x.stride())
    lay = _Layout(x)
    cfg = _config(lay, num_groups, x.device, tile, split)
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    rows = lay.N * num_groups
    partial = torch.empty(rows * cfg["split"] * 2, dtype=torch.float32, device=x.device)
    dw_part = torch.zeros(lay.N * cfg["split"], lay.C, dtype=torch.float32, device=x.device)
    db_part = torch.zeros_like(dw_part)
    if x.numel() == 0:
        return dx, dw_part.sum(0), db_part.sum(0)
    grid = (rows, cfg["split"])
    strides = (lay.stride_n, lay.stride_c, lay.stride_so, lay.stride_si, lay.S_inner)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=activation == "silu",
                 BLOCK_C=cfg["block_c"], BLOCK_S=cfg["block_s"], C_FAST=lay.c_fast,
                 SPLIT_S=lay.split_s, num_warps=cfg["num_warps"])
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    _gn_bwd_reduce_kernel[grid](
        x, dy, w_arg, b_arg, mean, rstd, partial, dw_part, db_part,
        lay.C, num_groups, cfg["cpg"], lay.S, cfg["s_per_split"], cfg["split"], *strides,
        **flags,
    )
    _gn_bwd_dx_kernel[grid](
        x, dy, dx, w_arg, b_arg, mean, rstd, partial,
        num_groups, cfg["cpg"], lay.S, cfg["s_per_split"], cfg["split"],
        float(cfg["cpg"] * lay.S), *strides, BLOCK_SPLIT=cfg["block_split"], **flags,
    )
    return dx, dw_part.sum(0), db_part.sum(0)


# --------------------------------------------------------------------------------------------
# The torch ops: fastvader::group_norm_fwd, fastvader::group_norm_bwd
# --------------------------------------------------------------------------------------------
def group_norm_backend(device) -> str:
    """The implementation the ops run for tensors on ``device``: 'triton', 'interpreter' or
    'reference' (the plain-PyTorch forward and backward)."""
    return active_backend(device) if _HAS_TRITON else "reference"


@torch.library.custom_op("fastvader::group_norm_fwd", mutates_args=())
def _group_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    num_groups: int, eps: float, activation: Optional[str], tile: Optional[int],
                    split: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd). ``tile`` and ``split`` override the Triton block size and the number of
    slices per group (None: the launcher's choice)."""
    if group_norm_backend(x.device) == "reference":
        y, mean, rstd = reference.group_norm_forward(x, num_groups, weight, bias, eps, activation)
        return _with_strides(y, _kernel_strides(x)), mean, rstd
    return _forward_launch(x, num_groups, weight, bias, eps, activation, tile, split)


@_group_norm_fwd.register_fake
def _group_norm_fwd_fake(x, weight, bias, num_groups, eps, activation, tile, split):
    stats = x.new_empty(x.shape[0] * num_groups, dtype=torch.float32)
    return x.new_empty_strided(x.shape, _kernel_strides(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("fastvader::group_norm_bwd", mutates_args=())
def _group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    activation: Optional[str], tile: Optional[int],
                    split: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx like y, the parameter gradients as fp32 (C,) sums."""
    if group_norm_backend(x.device) == "reference":
        dx, dweight, dbias = reference.group_norm_backward(dy, x, mean, rstd, num_groups, weight,
                                                           bias, activation)
        return _with_strides(dx, _kernel_strides(x)), dweight, dbias
    return _backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, tile, split)


@_group_norm_bwd.register_fake
def _group_norm_bwd_fake(dy, x, mean, rstd, weight, bias, num_groups, activation, tile, split):
    param_grad = x.new_empty(x.shape[1], dtype=torch.float32)
    return x.new_empty_strided(x.shape, _kernel_strides(x)), param_grad, torch.empty_like(param_grad)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, activation, tile, split = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # Only the input and the statistics (and the parameters, already resident): backward
    # recomputes the normalised values, and SiLU's input from them with weight and bias.
    ctx.save_for_backward(x, mean, rstd, weight, bias if activation == "silu" else None)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.config = (num_groups, activation, tile, split)


def _backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    num_groups, activation, tile, split = ctx.config
    dx, dweight, dbias = _group_norm_bwd(dy, x, mean, rstd, weight, bias, num_groups, activation,
                                         tile, split)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (dx if need_x else None,
            dweight.to(weight.dtype) if need_weight else None,
            dbias.to(ctx.bias_dtype) if need_bias else None,
            None, None, None, None, None)


_group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial) with optional fused SiLU; fp32 statistics.

    Triton on CUDA (and on CPU under TRITON_INTERPRET=1), plain PyTorch elsewhere. Either way
    only x, mean and rstd are kept for backward.
    """
    check_group_norm(x, num_groups, weight, bias, activation)
    return _group_norm_fwd(x, weight, bias, int(num_groups), float(eps), activation, None, None)[0]


def group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, *,
                      tile: Optional[int] = None, split: Optional[int] = None) -> torch.Tensor:
    """:func:`group_norm`, refusing the PyTorch path. ``tile`` and ``split`` override the block
    size and the number of slices per group (tests use them to reach the looped and split code
    paths with few programs; benchmarks to compare configurations)."""
    if group_norm_backend(x.device) == "reference":
        raise RuntimeError(f"group_norm_triton: no Triton path for {x.device} tensors here: install "
                           "triton, and on CPU set TRITON_INTERPRET=1 before triton is imported")
    check_group_norm(x, num_groups, weight, bias, activation)
    return _group_norm_fwd(x, weight, bias, int(num_groups), float(eps), activation, tile, split)[0]
