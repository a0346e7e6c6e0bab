"""GroupNorm (+ SiLU), kernel generation v1: the Triton kernels and launchers measured on an H200
before issue 15 (benchmarks/RESULTS.md), kept reachable with ``FASTVADER_KERNEL_IMPL=v1`` until
the GPU suite has confirmed v2 (:mod:`fastvader.kernels.ops.group_norm`, which registers the ops
and calls :func:`forward_launch` / :func:`backward_launch` here for v1).

Forward is two passes over each (sample, group), each group cut into slices: partial shifted sums
of x and x^2, then normalise + affine + SiLU; backward one pass for the two group sums dx needs
(and per-channel partial sums for dweight/dbias), one pass writing dx. Tiles of 4096 elements.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastvader.kernels._group_norm_layout import Layout as _Layout
from fastvader.kernels._group_norm_layout import kernel_strides as _kernel_strides
from fastvader.kernels._group_norm_layout import with_strides as _with_strides

from fastvader.kernels._triton import HAS_TRITON as _HAS_TRITON, tl, triton

__all__ = ["forward_launch", "backward_launch"]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:
    from fastvader.kernels._group_norm_layout import affine_params as _affine_params
    from fastvader.kernels._group_norm_layout import channel_sum as _channel_sum
    from fastvader.kernels._group_norm_layout import per_channel as _per_channel
    from fastvader.kernels._group_norm_layout import tile_offsets as _tile
    from fastvader.kernels._group_norm_layout import zero_tile as _zero_tile

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


def forward_launch(x, num_groups, weight, bias, eps, activation, tile=None, split=None):
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


def backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation,
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
