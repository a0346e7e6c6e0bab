"""Fused GroupNorm (+ optional SiLU) with a memory-lean backward, as the torch ops
``fastvader::group_norm_fwd`` / ``_bwd`` (training) and ``_infer`` (no gradients).

``group_norm(x, num_groups, weight, bias, eps, activation=None | "silu")`` normalises each
(sample, group) of ``x`` (shape (N, C, *spatial), any number of spatial dims) with fp32
statistics, applies the per-channel affine and, optionally, SiLU.

Why it exists: eager ``GroupNorm`` + ``SiLU`` keeps two full-size tensors for backward (the
norm's input and the SiLU's input). Here forward keeps only the input plus the per-group mean
and rstd (N*G floats each), and backward recomputes the normalised and activated values.

Kernel generation v2 (this file) has two paths, chosen per shape by a cached plan:

* resident (groups of at most ``RESIDENT_MAX_ELEMS`` elements, spatial axis innermost: the UNet
  sizes): one program per (sample, group) loads the group once into registers, takes exact
  statistics there (mean, then the centred sum of squares) and writes the output: one read and
  one write. Its backward loads x and dy once, reduces the two group sums dx needs and writes dx.
  When the norm's weight or bias needs a gradient the backward takes the split path, whose
  per-channel partial sums give those gradients;
* split (larger groups, the VAE decoder's, and channels-last inputs): programs take (channels x
  spatial slice) tiles laid out with the memory-contiguous axis last (channels-last tiles span
  all the groups of a pixel run), and write per-channel (mean, M2) partials, merged tile by tile
  and then across slices and channels with Chan's (parallel Welford) formula: exact, without the
  E[x^2] - E[x]^2 cancellation. A small kernel merges each group's partials; the apply pass
  normalises. Backward: per-channel sums of g and g * x_hat (g = d loss / d pre-activation)
  give dweight, dbias and, weighted by the weight, the two group sums for dx.

Layouts: the kernels address ``x`` through (sample, channel, outer run, inner run) strides
(:mod:`fastvader.kernels._group_norm_layout`), which covers contiguous, channels_last(_3d) and
the frame-major views diffusers' TemporalConvLayer feeds its norms, without a copy; outputs take
x's strides. ``dy`` is read through its own strides (no copy when they differ from x's).

Generation v1 (``group_norm_v1.py``, measured on an H200) stays reachable with
``FASTVADER_KERNEL_IMPL=v1``. Where Triton cannot run (CPU without TRITON_INTERPRET=1, or no
triton), the ops run the plain-PyTorch forward and backward of :mod:`fastvader.kernels.reference`.
``FusedGroupNormAct`` is in :mod:`fastvader.kernels.modules`; the diffusers drop-in in
``fastvader/patching/group_norm.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from fastvader.kernels import reference
from fastvader.kernels._backend import active_backend, kernel_impl
from fastvader.kernels._checks import check_group_norm
from fastvader.kernels._group_norm_layout import Layout, kernel_strides, with_strides
from fastvader.kernels.ops import group_norm_v1

from fastvader.kernels._triton import HAS_TRITON as _HAS_TRITON, tl, triton

__all__ = ["group_norm", "group_norm_triton", "group_norm_backend", "RESIDENT_MAX_ELEMS"]

# Largest group (power-of-two padded) one program keeps in registers: 32768 elements are 32 fp32
# values per thread at 32 warps (the UNet's largest groups: 10 channels x 48 x 48 = 23,040).
RESIDENT_MAX_ELEMS = 32768


# --------------------------------------------------------------------------------------------
# Triton kernels: the resident path
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:
    from fastvader.kernels._group_norm_layout import (
        affine_params,
        channel_sum,
        per_channel,
        tile_offsets,
        zero_tile,
    )

    @triton.jit
    def _group_offsets(e, stride_c, stride_so, stride_si, S: tl.constexpr, S_INNER: tl.constexpr,
                       SPLIT_S: tl.constexpr, CONTIGUOUS: tl.constexpr):
        """Offsets of the elements ``e`` (channel-major: e = channel * S + spatial) of one group;
        divisions are by constexprs, so they compile to multiplies and shifts."""
        if CONTIGUOUS:  # the group is one contiguous run (NCHW)
            return e
        c = e // S
        s = e - c * S
        if SPLIT_S:
            s_out = s // S_INNER
            return c * stride_c + s_out * stride_so + (s - s_out * S_INNER) * stride_si
        return c * stride_c + s * stride_si

    @triton.jit
    def _channel_params(W, B, channel, ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """fp32 weight and bias gathered per element (1 and 0 for an op without them)."""
        w = tl.load(W + channel, mask=ok, other=0.0).to(tl.float32) if HAS_W else 1.0
        b = tl.load(B + channel, mask=ok, other=0.0).to(tl.float32) if HAS_B else 0.0
        return w, b

    @triton.jit
    def _pre_activation_grad(x_hat, dy, w, b, SILU: tl.constexpr):
        """d(loss)/d(affine output) from d(loss)/d(op output), recomputing SiLU's input."""
        if SILU:
            z = x_hat * w + b
            sig = tl.sigmoid(z)
            return dy * sig * (1.0 + z * (1.0 - sig))
        return dy

    @triton.jit
    def _gn_resident_fwd_kernel(
        X, Y, W, B, Mean, Rstd, G, eps, stride_n, stride_c, stride_so, stride_si,
        CPG: tl.constexpr, S: tl.constexpr, S_INNER: tl.constexpr, BLOCK: tl.constexpr,
        SPLIT_S: tl.constexpr, CONTIGUOUS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        SILU: tl.constexpr, STORE_STATS: tl.constexpr,
    ):
        """One (sample, group) in registers: load once, exact statistics, write once."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid - n * G
        base = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
        e = tl.arange(0, BLOCK)
        ok = e < CPG * S
        off = base + _group_offsets(e, stride_c, stride_so, stride_si, S, S_INNER, SPLIT_S, CONTIGUOUS)
        x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / (CPG * S)
        centred = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / (CPG * S) + eps)
        w, b = _channel_params(W, B, g * CPG + e // S, ok, HAS_W, HAS_B)
        z = centred * rstd * w + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + off, z.to(Y.dtype.element_ty), mask=ok)
        if STORE_STATS:
            tl.store(Mean + pid, mean)
            tl.store(Rstd + pid, rstd)

    @triton.jit
    def _gn_resident_bwd_kernel(
        X, DY, DX, W, B, Mean, Rstd, G,
        stride_n, stride_c, stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si,
        CPG: tl.constexpr, S: tl.constexpr, S_INNER: tl.constexpr, BLOCK: tl.constexpr,
        SPLIT_S: tl.constexpr, CONTIGUOUS: tl.constexpr, DY_CONTIGUOUS: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ):
        """dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)) for one group held in
        registers (x and dy read once); dx takes x's strides."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid - n * G
        e = tl.arange(0, BLOCK)
        ok = e < CPG * S
        x_off = (n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
                 + _group_offsets(e, stride_c, stride_so, stride_si, S, S_INNER, SPLIT_S, CONTIGUOUS))
        dy_off = (n.to(tl.int64) * dy_stride_n + (g * CPG).to(tl.int64) * dy_stride_c
                  + _group_offsets(e, dy_stride_c, dy_stride_so, dy_stride_si, S, S_INNER, SPLIT_S, DY_CONTIGUOUS))
        mean = tl.load(Mean + pid)
        rstd = tl.load(Rstd + pid)
        x_hat = tl.where(ok, (tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
        dy = tl.load(DY + dy_off, mask=ok, other=0.0).to(tl.float32)
        w, b = _channel_params(W, B, g * CPG + e // S, ok, HAS_W, HAS_B)
        dx_hat = tl.where(ok, _pre_activation_grad(x_hat, dy, w, b, SILU) * w, 0.0)
        c1 = tl.sum(dx_hat, axis=0) / (CPG * S)
        c2 = tl.sum(dx_hat * x_hat, axis=0) / (CPG * S)
        tl.store(DX + x_off, (rstd * (dx_hat - c1 - x_hat * c2)).to(DX.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Triton kernels: the split path (per-channel partials over spatial slices)
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _slice_bounds(S, S_PER_SPLIT, SPLIT, C, BLOCK_C: tl.constexpr):
        """This program's sample, slice row (sample * SPLIT + slice), spatial range and channels."""
        row = tl.program_id(0)
        n = row // SPLIT
        s_lo = (row - n * SPLIT) * S_PER_SPLIT
        c_idx = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return n.to(tl.int64), row.to(tl.int64), s_lo, tl.minimum(s_lo + S_PER_SPLIT, S), c_idx, c_idx < C

    @triton.jit
    def _gn_split_stats_kernel(
        X, Part, C, S, S_PER_SPLIT, SPLIT, stride_n, stride_c, stride_so, stride_si, S_INNER,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
    ):
        """Per channel, over one spatial slice of one sample: (mean, M2), each tile's exact
        statistics merged into the running ones with Chan's formula."""
        n, row, s_lo, s_hi, c_idx, c_ok = _slice_bounds(S, S_PER_SPLIT, SPLIT, C, BLOCK_C)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            off, mask = tile_offsets(c_idx, s0 + tl.arange(0, BLOCK_S), C, s_hi, stride_c, stride_so,
                                     stride_si, S_INNER, C_FAST, SPLIT_S)
            v = tl.load(X + n * stride_n + off, mask=mask, other=0.0).to(tl.float32)
            seen = (s0 - s_lo).to(tl.float32)
            count = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
            tile_mean = channel_sum(v, C_FAST) / count
            dev = tl.where(mask, v - per_channel(tile_mean, C_FAST), 0.0)
            delta = tile_mean - mean
            mean += delta * (count / (seen + count))
            m2 += channel_sum(dev * dev, C_FAST) + delta * delta * (seen * count / (seen + count))
        out = Part + (row * C + c_idx) * 2
        tl.store(out, mean, mask=c_ok)
        tl.store(out + 1, m2, mask=c_ok)

    @triton.jit
    def _group_partials(Part, n, g, k, k_ok, c0, SPLIT, C, CPG, BLOCK_CPG: tl.constexpr):
        """The (slices, channels) partial pairs of channels c0.. of group g (zeros where masked)."""
        j = c0 + tl.arange(0, BLOCK_CPG)
        mask = k_ok[:, None] & (j < CPG)[None, :]
        ptrs = Part + (((n * SPLIT + k).to(tl.int64) * C)[:, None] + (g * CPG + j)[None, :]) * 2
        return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + 1, mask=mask, other=0.0), mask

    @triton.jit
    def _gn_split_finalize_kernel(
        Part, Mean, Rstd, G, C, CPG, S, S_PER_SPLIT, SPLIT, eps,
        BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr,
    ):
        """mean and rstd of one (sample, group) from its (slice, channel) partials: the mean of
        the means weighted by counts, then M2 = sum(M2_i + count_i * (mean_i - mean)^2)."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid - n * G
        k = tl.arange(0, BLOCK_K)
        k_ok = k < SPLIT
        count = tl.where(k_ok, tl.minimum(S_PER_SPLIT, S - k * S_PER_SPLIT), 0).to(tl.float32)
        total = (CPG * S).to(tl.float32)
        acc = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        for c0 in range(0, CPG, BLOCK_CPG):
            means, _, _ = _group_partials(Part, n, g, k, k_ok, c0, SPLIT, C, CPG, BLOCK_CPG)
            acc += means * count[:, None]
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        for c0 in range(0, CPG, BLOCK_CPG):
            means, m2s, mask = _group_partials(Part, n, g, k, k_ok, c0, SPLIT, C, CPG, BLOCK_CPG)
            dev = means - mean
            acc += tl.where(mask, m2s + count[:, None] * dev * dev, 0.0)
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps))

    @triton.jit
    def _gn_split_apply_kernel(
        X, Y, W, B, Mean, Rstd, G, C, CPG, S, S_PER_SPLIT, SPLIT,
        stride_n, stride_c, stride_so, stride_si, S_INNER,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ):
        """y = act(x * (w * rstd) + (b - mean * rstd * w)) over one slice of a block of channels."""
        n, _, s_lo, s_hi, c_idx, c_ok = _slice_bounds(S, S_PER_SPLIT, SPLIT, C, BLOCK_C)
        stat = n * G + c_idx // CPG
        mean = tl.load(Mean + stat, mask=c_ok, other=0.0)
        rstd = tl.load(Rstd + stat, mask=c_ok, other=0.0)
        w, b = affine_params(W, B, c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
        scale = per_channel(w * rstd, C_FAST)
        shift = per_channel(b - mean * rstd * w, C_FAST)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            off, mask = tile_offsets(c_idx, s0 + tl.arange(0, BLOCK_S), C, s_hi, stride_c, stride_so,
                                     stride_si, S_INNER, C_FAST, SPLIT_S)
            z = tl.load(X + n * stride_n + off, mask=mask, other=0.0).to(tl.float32) * scale + shift
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(Y + n * stride_n + off, z.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _split_grad_tile(X, DY, n, c_idx, s0, s_hi, mean, rstd, w_t, b_t, C, stride_n, stride_c,
                         stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si,
                         S_INNER, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
                         SILU: tl.constexpr):
        """One tile's x_hat and g = d(loss)/d(affine output) (zeros where masked), and x's offsets."""
        s_idx = s0 + tl.arange(0, BLOCK_S)
        off, mask = tile_offsets(c_idx, s_idx, C, s_hi, stride_c, stride_so, stride_si, S_INNER, C_FAST, SPLIT_S)
        dy_off, _ = tile_offsets(c_idx, s_idx, C, s_hi, dy_stride_c, dy_stride_so, dy_stride_si, S_INNER,
                                 C_FAST, SPLIT_S)
        x_hat = (tl.load(X + n * stride_n + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        x_hat = tl.where(mask, x_hat, 0.0)
        dy = tl.load(DY + n * dy_stride_n + dy_off, mask=mask, other=0.0).to(tl.float32)
        return x_hat, tl.where(mask, _pre_activation_grad(x_hat, dy, w_t, b_t, SILU), 0.0), off, mask

    @triton.jit
    def _gn_split_bwd_reduce_kernel(
        X, DY, W, B, Mean, Rstd, Part, G, C, CPG, S, S_PER_SPLIT, SPLIT,
        stride_n, stride_c, stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si, S_INNER,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ):
        """Per channel, over one slice: sum(g) and sum(g * x_hat), the bias and weight gradients'
        partial sums (and, times the weight, the group sums dx needs)."""
        n, row, s_lo, s_hi, c_idx, c_ok = _slice_bounds(S, S_PER_SPLIT, SPLIT, C, BLOCK_C)
        stat = n * G + c_idx // CPG
        mean = per_channel(tl.load(Mean + stat, mask=c_ok, other=0.0), C_FAST)
        rstd = per_channel(tl.load(Rstd + stat, mask=c_ok, other=0.0), C_FAST)
        w, b = affine_params(W, B, c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
        sum_g = zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        sum_gx = zero_tile(BLOCK_C, BLOCK_S, C_FAST)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            x_hat, g, _, _ = _split_grad_tile(
                X, DY, n, c_idx, s0, s_hi, mean, rstd, per_channel(w, C_FAST), per_channel(b, C_FAST), C,
                stride_n, stride_c, stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si,
                S_INNER, BLOCK_S, C_FAST, SPLIT_S, SILU)
            sum_g += g
            sum_gx += g * x_hat
        out = Part + (row * C + c_idx) * 2
        tl.store(out, channel_sum(sum_g, C_FAST), mask=c_ok)
        tl.store(out + 1, channel_sum(sum_gx, C_FAST), mask=c_ok)

    @triton.jit
    def _gn_split_bwd_finalize_kernel(
        Part, W, Coef, G, C, CPG, S, SPLIT, HAS_W: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_CPG: tl.constexpr,
    ):
        """The two group means dx needs, mean(dx_hat) and mean(dx_hat * x_hat) with
        dx_hat = g * w, from the per-channel partial sums of one (sample, group)."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid - n * G
        k = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        for c0 in range(0, CPG, BLOCK_CPG):
            sum_g, sum_gx, _ = _group_partials(Part, n, g, k, k < SPLIT, c0, SPLIT, C, CPG, BLOCK_CPG)
            j = c0 + tl.arange(0, BLOCK_CPG)
            w = tl.load(W + g * CPG + j, mask=j < CPG, other=0.0).to(tl.float32)[None, :] if HAS_W else 1.0
            acc_g += sum_g * w
            acc_gx += sum_gx * w
        group_size = (CPG * S).to(tl.float32)
        tl.store(Coef + pid * 2, tl.sum(tl.sum(acc_g, axis=1), axis=0) / group_size)
        tl.store(Coef + pid * 2 + 1, tl.sum(tl.sum(acc_gx, axis=1), axis=0) / group_size)

    @triton.jit
    def _gn_split_bwd_dx_kernel(
        X, DY, DX, W, B, Mean, Rstd, Coef, G, C, CPG, S, S_PER_SPLIT, SPLIT,
        stride_n, stride_c, stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si, S_INNER,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr, SPLIT_S: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ):
        """dx = rstd * (g * w - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)) over one slice."""
        n, _, s_lo, s_hi, c_idx, c_ok = _slice_bounds(S, S_PER_SPLIT, SPLIT, C, BLOCK_C)
        stat = n * G + c_idx // CPG
        mean = per_channel(tl.load(Mean + stat, mask=c_ok, other=0.0), C_FAST)
        rstd = per_channel(tl.load(Rstd + stat, mask=c_ok, other=0.0), C_FAST)
        c1 = per_channel(tl.load(Coef + stat * 2, mask=c_ok, other=0.0), C_FAST)
        c2 = per_channel(tl.load(Coef + stat * 2 + 1, mask=c_ok, other=0.0), C_FAST)
        w, b = affine_params(W, B, c_idx, c_ok, BLOCK_C, HAS_W, HAS_B)
        w_t = per_channel(w, C_FAST)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            x_hat, g, off, mask = _split_grad_tile(
                X, DY, n, c_idx, s0, s_hi, mean, rstd, w_t, per_channel(b, C_FAST), C,
                stride_n, stride_c, stride_so, stride_si, dy_stride_n, dy_stride_c, dy_stride_so, dy_stride_si,
                S_INNER, BLOCK_S, C_FAST, SPLIT_S, SILU)
            dx = rstd * (g * w_t - c1 - x_hat * c2)
            tl.store(DX + n * stride_n + off, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Plans: the path and block sizes per (shape, strides, groups, device), cached
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class _Plan:
    layout: Layout
    cpg: int
    resident_block: int  # elements per resident program; 0 when groups take the split path
    resident_warps: int
    split: int  # spatial slices per sample on the split path
    s_per_split: int
    block_c: int
    block_s: int
    split_warps: int

    def describe(self) -> str:
        if self.resident_block:
            return f"resident BLOCK={self.resident_block} warps={self.resident_warps}"
        return (f"split slices={self.split} BLOCK_C={self.block_c} BLOCK_S={self.block_s} "
                f"warps={self.split_warps} channels_last_tiles={self.layout.c_fast}")


def _plan(x: torch.Tensor, num_groups: int, tile: Optional[int], split: Optional[int]) -> _Plan:
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 0
    return _cached_plan(tuple(x.shape), tuple(x.stride()), num_groups, sms, tile, split)


@functools.lru_cache(maxsize=1024)
def _cached_plan(shape: tuple, strides: tuple, num_groups: int, sms: int, tile: Optional[int],
                 split: Optional[int]) -> _Plan:
    """Resident when a group fits on chip and the spatial axis is innermost (and no ``split`` is
    forced); else split tiles of ~``tile`` elements, the contiguous axis last, with enough slices
    per sample to give every SM (``sms``; 0 = the interpreter, one slice) a few programs."""
    layout = Layout(torch.empty_strided(shape, strides, device="meta"))
    cpg = layout.C // num_groups
    block = _next_pow2(cpg * layout.S)
    resident = split is None and not layout.c_fast and block <= RESIDENT_MAX_ELEMS
    # The interpreter pays per program and per op, little per element: big tiles there.
    tile = tile or (4096 if sms else 16384)
    if layout.c_fast:  # channels-last: a tile row is a run of contiguous channels, across groups
        block_c = min(_next_pow2(layout.C), 64 if sms else 256, tile)
        block_s = max(1, min(_next_pow2(layout.S), tile // block_c))
    else:
        block_s = max(1, min(_next_pow2(layout.S), 1024 if sms else tile, tile))
        block_c = max(1, min(_next_pow2(layout.C), tile // block_s))
    s_blocks = _cdiv(layout.S, block_s)
    if split is None:
        split = max(1, min(s_blocks, _cdiv(4 * sms, layout.N * _cdiv(layout.C, block_c)))) if sms else 1
    split = max(1, min(int(split), s_blocks))
    s_per_split = _cdiv(s_blocks, split) * block_s
    return _Plan(layout, cpg, block if resident else 0, min(32, max(4, block // 1024)),
                 _cdiv(layout.S, s_per_split), s_per_split, block_c, block_s,
                 8 if block_c * block_s >= 4096 else 4)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _resident_constexprs(plan: _Plan, contiguous: bool) -> dict:
    lay = plan.layout
    return dict(CPG=plan.cpg, S=lay.S, S_INNER=lay.S_inner, BLOCK=plan.resident_block, SPLIT_S=lay.split_s,
                CONTIGUOUS=contiguous, num_warps=plan.resident_warps)


def _group_contiguous(plan: _Plan, strides: tuple[int, int, int, int]) -> bool:
    """Whether each group is one contiguous run under these (n, c, outer, inner) strides."""
    _, stride_c, stride_so, stride_si = strides
    lay = plan.layout
    return stride_si == 1 and (not lay.split_s or stride_so == lay.S_inner) and stride_c == lay.S


def _split_grid(plan: _Plan) -> tuple[int, int]:
    return plan.layout.N * plan.split, _cdiv(plan.layout.C, plan.block_c)


def _split_args(plan: _Plan) -> tuple:
    lay = plan.layout
    return lay.C, plan.cpg, lay.S, plan.s_per_split, plan.split


def _split_tiles(plan: _Plan) -> dict:
    return dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, C_FAST=plan.layout.c_fast,
                SPLIT_S=plan.layout.split_s, num_warps=plan.split_warps)


def _finalize_blocks(plan: _Plan) -> dict:
    return dict(BLOCK_K=_next_pow2(plan.split), BLOCK_CPG=min(_next_pow2(plan.cpg), 64))


def _split_forward(plan, x, y, w_arg, b_arg, mean, rstd, num_groups, eps, flags) -> None:
    """Stats partials, per-group merge, apply: the forward for groups that do not fit on chip."""
    lay = plan.layout
    part = torch.empty((lay.N * plan.split, lay.C, 2), dtype=torch.float32, device=x.device)
    c, cpg, s, s_per_split, split = _split_args(plan)
    _gn_split_stats_kernel[_split_grid(plan)](
        x, part, c, s, s_per_split, split, *lay.strides(), lay.S_inner, **_split_tiles(plan))
    _gn_split_finalize_kernel[(lay.N * num_groups,)](
        part, mean, rstd, num_groups, c, cpg, s, s_per_split, split, float(eps), **_finalize_blocks(plan))
    _gn_split_apply_kernel[_split_grid(plan)](
        x, y, w_arg, b_arg, mean, rstd, num_groups, *_split_args(plan), *lay.strides(), lay.S_inner,
        **_split_tiles(plan), **flags)


def _forward_launch(x, num_groups, weight, bias, eps, activation, tile=None, split=None, store_stats=True):
    """(y, mean, rstd): y in x's dtype and kernel strides; mean and rstd fp32 (N*G,), or empty
    when ``store_stats`` is False (nothing will need gradients)."""
    x = with_strides(x, kernel_strides(x))
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    rows = x.shape[0] * num_groups
    mean, rstd = (torch.empty(rows if store_stats else 0, dtype=torch.float32, device=x.device) for _ in range(2))
    if x.numel() == 0:
        return y, mean, rstd
    plan = _plan(x, num_groups, tile, split)
    w_arg, b_arg = (weight if weight is not None else x), (bias if bias is not None else x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=activation == "silu")
    if plan.resident_block:
        _gn_resident_fwd_kernel[(rows,)](
            x, y, w_arg, b_arg, mean, rstd, num_groups, float(eps), *plan.layout.strides(),
            STORE_STATS=store_stats, **_resident_constexprs(plan, _group_contiguous(plan, plan.layout.strides())),
            **flags)
        return y, mean, rstd
    # the split path's apply pass reads the statistics back: they always exist there
    stats = (mean, rstd) if store_stats else tuple(torch.empty(rows, dtype=torch.float32, device=x.device)
                                                   for _ in range(2))
    _split_forward(plan, x, y, w_arg, b_arg, *stats, num_groups, eps, flags)
    return y, mean, rstd


def _split_backward(plan, x, dy, dy_strides, dx, w_arg, b_arg, mean, rstd, num_groups, flags) -> torch.Tensor:
    """Per-channel partial sums, per-group coefficients, dx; returns the (N*slices, C, 2)
    partials (sum g, sum g * x_hat), from which the parameter gradients are summed."""
    lay = plan.layout
    part = torch.empty((lay.N * plan.split, lay.C, 2), dtype=torch.float32, device=x.device)
    coef = torch.empty((lay.N * num_groups, 2), dtype=torch.float32, device=x.device)
    strides = (*lay.strides(), *dy_strides, lay.S_inner)
    _gn_split_bwd_reduce_kernel[_split_grid(plan)](
        x, dy, w_arg, b_arg, mean, rstd, part, num_groups, *_split_args(plan), *strides,
        **_split_tiles(plan), **flags)
    _gn_split_bwd_finalize_kernel[(lay.N * num_groups,)](
        part, w_arg, coef, num_groups, lay.C, plan.cpg, lay.S, plan.split, HAS_W=flags["HAS_W"],
        **_finalize_blocks(plan))
    _gn_split_bwd_dx_kernel[_split_grid(plan)](
        x, dy, dx, w_arg, b_arg, mean, rstd, coef, num_groups, *_split_args(plan), *strides,
        **_split_tiles(plan), **flags)
    return part


def _backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, param_grads,
                     tile=None, split=None):
    """(dx, dweight, dbias): dx like y; the parameter gradients as fp32 (C,) sums when
    ``param_grads``, else None. dy is read through its own strides."""
    x = with_strides(x, kernel_strides(x))
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return (dx, *(x.new_zeros(x.shape[1], dtype=torch.float32) for _ in range(2))) if param_grads else (dx, None, None)
    plan = _plan(x, num_groups, tile, split)
    dy_strides = plan.layout.strides_of(dy)
    if dy_strides is None:  # dy's dims do not chain where x's do (rare): one copy
        dy = dy.contiguous()
        dy_strides = plan.layout.strides_of(dy)
    w_arg, b_arg = (weight if weight is not None else x), (bias if bias is not None else x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=activation == "silu")
    if plan.resident_block and not param_grads:
        _gn_resident_bwd_kernel[(x.shape[0] * num_groups,)](
            x, dy, dx, w_arg, b_arg, mean, rstd, num_groups, *plan.layout.strides(), *dy_strides,
            DY_CONTIGUOUS=_group_contiguous(plan, dy_strides),
            **_resident_constexprs(plan, _group_contiguous(plan, plan.layout.strides())), **flags)
        return dx, None, None
    part = _split_backward(plan, x, dy, dy_strides, dx, w_arg, b_arg, mean, rstd, num_groups, flags)
    if not param_grads:
        return dx, None, None
    # summed over samples and slices; two reductions, so the outputs share no storage
    return dx, part[..., 1].sum(dim=0), part[..., 0].sum(dim=0)


# --------------------------------------------------------------------------------------------
# The torch ops: fastvader::group_norm_fwd, _bwd (training) and _infer (no gradients)
# --------------------------------------------------------------------------------------------
def group_norm_backend(device) -> str:
    """The implementation the ops run for tensors on ``device``: 'triton', 'interpreter' or
    'reference' (the plain-PyTorch forward and backward)."""
    return active_backend(device) if _HAS_TRITON else "reference"


def _forward(x, weight, bias, num_groups, eps, activation, tile, split, store_stats):
    if group_norm_backend(x.device) == "reference":
        y, mean, rstd = reference.group_norm_forward(x, num_groups, weight, bias, eps, activation)
        return with_strides(y, kernel_strides(x)), mean, rstd
    if kernel_impl() == "v1":
        return group_norm_v1.forward_launch(x, num_groups, weight, bias, eps, activation, tile, split)
    return _forward_launch(x, num_groups, weight, bias, eps, activation, tile, split, store_stats=store_stats)


@torch.library.custom_op("fastvader::group_norm_fwd", mutates_args=())
def _group_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    num_groups: int, eps: float, activation: Optional[str], tile: Optional[int],
                    split: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd). ``split`` forces the split path with that many slices per sample, and
    ``tile`` sets its tile size (None: the plan's choice)."""
    return _forward(x, weight, bias, num_groups, eps, activation, tile, split, store_stats=True)


@_group_norm_fwd.register_fake
def _group_norm_fwd_fake(x, weight, bias, num_groups, eps, activation, tile, split):
    stats = x.new_empty(x.shape[0] * num_groups, dtype=torch.float32)
    return x.new_empty_strided(x.shape, kernel_strides(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("fastvader::group_norm_infer", mutates_args=())
def _group_norm_infer(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      num_groups: int, eps: float, activation: Optional[str], tile: Optional[int],
                      split: Optional[int]) -> torch.Tensor:
    """The forward when nothing needs gradients: y only, no statistics stored."""
    return _forward(x, weight, bias, num_groups, eps, activation, tile, split, store_stats=False)[0]


@_group_norm_infer.register_fake
def _group_norm_infer_fake(x, weight, bias, num_groups, eps, activation, tile, split):
    return x.new_empty_strided(x.shape, kernel_strides(x))


@torch.library.custom_op("fastvader::group_norm_bwd", mutates_args=())
def _group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    activation: Optional[str], tile: Optional[int],
                    split: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx like y, the parameter gradients as fp32 (C,) sums."""
    if group_norm_backend(x.device) == "reference":
        dx, dweight, dbias = reference.group_norm_backward(dy, x, mean, rstd, num_groups, weight, bias, activation)
        return with_strides(dx, kernel_strides(x)), dweight, dbias
    if kernel_impl() == "v1":
        return group_norm_v1.backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, tile, split)
    return _backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, True, tile, split)


@_group_norm_bwd.register_fake
def _group_norm_bwd_fake(dy, x, mean, rstd, weight, bias, num_groups, activation, tile, split):
    param_grad = x.new_empty(x.shape[1], dtype=torch.float32)
    return x.new_empty_strided(x.shape, kernel_strides(x)), param_grad, torch.empty_like(param_grad)


# A separate op rather than a flag on group_norm_bwd: compiled graphs cached by torch.compile
# call ops by their schema, which must not change under them.
@torch.library.custom_op("fastvader::group_norm_bwd_input", mutates_args=())
def _group_norm_bwd_input(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                          activation: Optional[str], tile: Optional[int], split: Optional[int]) -> torch.Tensor:
    """dx alone, when neither weight nor bias needs a gradient (v2: the resident backward where
    groups fit on chip)."""
    if group_norm_backend(x.device) == "reference":
        dx = reference.group_norm_backward(dy, x, mean, rstd, num_groups, weight, bias, activation)[0]
        return with_strides(dx, kernel_strides(x))
    if kernel_impl() == "v1":
        return group_norm_v1.backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, tile, split)[0]
    return _backward_launch(x, dy, mean, rstd, num_groups, weight, bias, activation, False, tile, split)[0]


@_group_norm_bwd_input.register_fake
def _group_norm_bwd_input_fake(dy, x, mean, rstd, weight, bias, num_groups, activation, tile, split):
    return x.new_empty_strided(x.shape, kernel_strides(x))


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
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_weight or need_bias):
        dx = _group_norm_bwd_input(dy, x, mean, rstd, weight, bias, num_groups, activation, tile, split)
        return dx, None, None, None, None, None, None, None
    dx, dweight, dbias = _group_norm_bwd(dy, x, mean, rstd, weight, bias, num_groups, activation, tile, split)
    return (dx if need_x else None,
            dweight.to(weight.dtype) if need_weight else None,
            dbias.to(ctx.bias_dtype) if need_bias else None,
            None, None, None, None, None)


_group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _run(x, num_groups, weight, bias, eps, activation, tile, split) -> torch.Tensor:
    """The training op when anything needs a gradient, else the inference op (no statistics)."""
    args = (x, weight, bias, int(num_groups), float(eps), activation, tile, split)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _group_norm_fwd(*args)[0]
    return _group_norm_infer(*args)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial) with optional fused SiLU; fp32 statistics.

    Triton on CUDA (and on CPU under TRITON_INTERPRET=1), plain PyTorch elsewhere. Either way
    only x, mean and rstd are kept for backward; when nothing needs gradients the inference op
    runs, which stores no statistics.
    """
    check_group_norm(x, num_groups, weight, bias, activation)
    return _run(x, num_groups, weight, bias, eps, activation, None, None)


def group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, *,
                      tile: Optional[int] = None, split: Optional[int] = None) -> torch.Tensor:
    """:func:`group_norm`, refusing the PyTorch path. ``split`` forces the split path with that
    many slices per sample and ``tile`` sets its tile size (tests use them to reach the looped and
    split code with few programs; benchmarks to compare configurations)."""
    if group_norm_backend(x.device) == "reference":
        raise RuntimeError(f"group_norm_triton: no Triton path for {x.device} tensors here: install "
                           "triton, and on CPU set TRITON_INTERPRET=1 before triton is imported")
    check_group_norm(x, num_groups, weight, bias, activation)
    return _run(x, num_groups, weight, bias, eps, activation, tile, split)
