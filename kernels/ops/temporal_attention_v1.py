"""Temporal attention, kernel generation v1: the Triton kernels and launchers measured on an H200
before issue 15 (benchmarks/RESULTS.md), kept reachable with ``FASTVADER_KERNEL_IMPL=v1`` until
the GPU suite has confirmed v2 (:mod:`fastvader.kernels.ops.temporal_attention`, which registers
the ops and calls :func:`launch_forward` / :func:`launch_backward` here for v1).

One program takes a block of BLOCK_N rows (clips) for one head, loads the whole
(BLOCK_N, F, head_dim) tiles once and works on them with batched 3-D ``tl.dot``s: the forward
writes the output and the per-row log2-sum-exp, the backward recomputes the probabilities and
writes dq, dk, dv, adding a broadcast bias's gradient with atomics.
"""
from __future__ import annotations

import torch

from fastvader.kernels import reference
from fastvader.kernels._backend import interpreter_enabled
from fastvader.kernels._checks import bias_grad_shape, bias_view
from fastvader.kernels._interpreted import interpreter_view

from fastvader.kernels._triton import HAS_TRITON as _HAS_TRITON, tl, triton

__all__ = ["launch_forward", "launch_backward"]

# Register budget on a real GPU, in elements per thread of the tiles a program keeps live. Both
# kernels keep k and v whole (the backward also dk and dv: F x head_dim each, per row) and walk
# the query frames in blocks of Q_BLOCK, holding per block q and out (backward: also dout, dq)
# at Q_BLOCK x head_dim and scores and probabilities (backward: also dP, dS) at Q_BLOCK x F.
# Calibrated on sm_90 cubins (cuobjdump resource usage, bf16, with bias, see
# benchmarks/compile_temporal_attention.py).
_FWD_ELEMS_PER_THREAD = 144
_BWD_ELEMS_PER_THREAD = 160
# Query frames per step. Up to 32 padded frames one step is best (the unrolled loop keeps extra
# copies of k and v live: F = 24 spilled 272 bytes in blocks of 16 against 64 in one step);
# from 64 padded frames, blocks of 16 cut the backward's spills from ~14 KB to ~5 KB.
_Q_BLOCK = 16  # tl.dot needs >= 16
_BLOCKED_FROM_F_PAD = 64
_MAX_WARPS = 8
# Under the interpreter every program costs ~2 ms of Python, whatever its size: take many rows
# (the interpreter refuses tensors of more than 2^20 elements).
_INTERPRETER_TILE_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Triton kernels (INTERPRETED: see fastvader.kernels._interpreted)
# ----------------------------------------------------------------------------------------------
if _HAS_TRITON:
    from fastvader.kernels._interpreted import dot_operand as _dot_operand
    from fastvader.kernels._interpreted import for_store as _for_store
    from fastvader.kernels._interpreted import to_fp32 as _to_fp32

    @triton.jit
    def _row_block(N, F, HEAD_DIM, BLOCK_N: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr):
        """Index tiles of this program's rows, as int64 (N x row-stride can pass 2^31): rows
        (BLOCK_N, 1) and (BLOCK_N, 1, 1), frames (1, F_PAD, 1), dims (1, 1, D_PAD), and the
        (rows, frames, dims) mask."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        r3 = rows[:, None, None]
        f3 = tl.arange(0, F_PAD)[None, :, None]
        d3 = tl.arange(0, D_PAD)[None, None, :]
        return rows[:, None], r3, f3, d3, (r3 < N) & (f3 < F) & (d3 < HEAD_DIM)

    @triton.jit
    def _scores_log2(q, k, Bias, r3, qi, fj, head, N, F, sbn, sbh, sbi, sbj, qk_scale_log2,
                     HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """Scores of a block of query frames against every key frame, in log2 units
        ((q k^T * scale + bias) * log2(e), so softmax takes exp2); padded key frames get -inf."""
        s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=INPUT_PRECISION) * qk_scale_log2
        if HAS_BIAS:
            b_mask = (r3 < N) & (qi < F) & (fj < F)
            b = tl.load(Bias + r3 * sbn + head * sbh + qi * sbi + fj * sbj, mask=b_mask, other=0.0)
            s = s + _to_fp32(b, INTERPRETED) * 1.4426950408889634
        return tl.where(fj < F, s, float("-inf"))

    @triton.jit
    def _temporal_attn_fwd_kernel(
        Q, K, V, Bias, Out, Lse,
        N, F, HEADS, HEAD_DIM,
        sqn, sqf, sqc,
        skn, skf, skc,
        svn, svf, svc,
        sbn, sbh, sbi, sbj,
        son, sof,
        qk_scale_log2,
        HAS_BIAS: tl.constexpr,
        INTERPRETED: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        F_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        Q_BLOCK: tl.constexpr,
    ):
        # grid: (row blocks, heads); axis 0 allows 2^31 - 1 programs, so any N works
        head = tl.program_id(1)
        r2, r3, f3, d3, tile_mask = _row_block(N, F, HEAD_DIM, BLOCK_N, F_PAD, D_PAD)
        chan = head * HEAD_DIM + d3
        fj = tl.arange(0, F_PAD)[None, None, :]  # key frames
        k = _dot_operand(tl.load(K + r3 * skn + f3 * skf + chan * skc, mask=tile_mask, other=0.0), INTERPRETED)
        v = _dot_operand(tl.load(V + r3 * svn + f3 * svf + chan * svc, mask=tile_mask, other=0.0), INTERPRETED)

        # Every key frame is in registers, so each block of Q_BLOCK query frames takes an exact
        # softmax (no running maximum); blocks keep the Q_BLOCK x F tiles small for long clips.
        for q_start in tl.static_range(0, F_PAD, Q_BLOCK):
            qf = q_start + tl.arange(0, Q_BLOCK)
            qi = qf[None, :, None]
            q_mask = (r3 < N) & (qi < F) & (d3 < HEAD_DIM)
            q = _dot_operand(tl.load(Q + r3 * sqn + qi * sqf + chan * sqc, mask=q_mask, other=0.0), INTERPRETED)
            s = _scores_log2(q, k, Bias, r3, qi, fj, head, N, F, sbn, sbh, sbi, sbj, qk_scale_log2,
                             HAS_BIAS, INTERPRETED, INPUT_PRECISION)
            m = tl.max(s, axis=2)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: avoid inf - inf
            p = tl.exp2(s - m_safe[:, :, None])
            l = tl.sum(p, axis=2)
            l_safe = tl.where(l == 0.0, 1.0, l)
            o = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) / l_safe[:, :, None]
            tl.store(Out + r3 * son + qi * sof + chan, _for_store(o, Out, INTERPRETED), mask=q_mask)

            # Fully masked rows store lse = +inf: the backward's exp2(s - lse) gives p = 0 there.
            lse = tl.where(l == 0.0, float("inf"), m_safe + tl.log2(l_safe))
            q2 = qf[None, :]
            tl.store(Lse + (r2 * HEADS + head) * F + q2, lse, mask=(r2 < N) & (q2 < F))

    @triton.jit
    def _add_bias_grad(DBias, ds, r3, qf, N, F, head, sdbn, sdbh,
                       F_PAD: tl.constexpr, PER_ROW: tl.constexpr):
        """Add d(scores) of a block of query frames into the fp32 (Nb, Hb, F, F) bias gradient,
        Nb in {1, N} and Hb in {1, HEADS}: a zero stride folds a broadcast dim, and atomics add
        the contributions that share a slot."""
        frames = tl.arange(0, F_PAD)
        if PER_ROW:
            qi = qf[None, :, None]
            fj = frames[None, None, :]
            tl.atomic_add(DBias + r3 * sdbn + head * sdbh + qi * F + fj, ds,
                          mask=(r3 < N) & (qi < F) & (fj < F))
        else:
            qi2 = qf[:, None]
            fj2 = frames[None, :]
            # padded rows have p = 0, hence ds = 0: summing over the row axis is safe
            tl.atomic_add(DBias + head * sdbh + qi2 * F + fj2, tl.sum(ds, axis=0),
                          mask=(qi2 < F) & (fj2 < F))

    @triton.jit
    def _temporal_attn_bwd_kernel(
        Q, K, V, Bias, Out, DOut, Lse, DQ, DK, DV, DBias,
        N, F, HEADS, HEAD_DIM,
        sqn, sqf, sqc,
        skn, skf, skc,
        svn, svf, svc,
        sbn, sbh, sbi, sbj,
        son, sof,
        sdon, sdof, sdoc,
        sdbn, sdbh,
        qk_scale_log2, scale,
        HAS_BIAS: tl.constexpr,
        BIAS_GRAD: tl.constexpr,
        BIAS_GRAD_PER_ROW: tl.constexpr,
        INTERPRETED: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        F_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        Q_BLOCK: tl.constexpr,
    ):
        head = tl.program_id(1)
        r2, r3, f3, d3, tile_mask = _row_block(N, F, HEAD_DIM, BLOCK_N, F_PAD, D_PAD)
        chan = head * HEAD_DIM + d3
        fj = tl.arange(0, F_PAD)[None, None, :]  # key frames
        # dq/dk/dv are fresh contiguous (N, F, C) tensors: strides F*C, C, 1.
        g_row = r3 * F * (HEADS * HEAD_DIM)
        k = _dot_operand(tl.load(K + r3 * skn + f3 * skf + chan * skc, mask=tile_mask, other=0.0), INTERPRETED)
        v = _dot_operand(tl.load(V + r3 * svn + f3 * svf + chan * svc, mask=tile_mask, other=0.0), INTERPRETED)
        dk = tl.zeros((BLOCK_N, F_PAD, D_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, F_PAD, D_PAD), dtype=tl.float32)

        # Query frames in blocks of Q_BLOCK: k, v, dk, dv stay whole, the F x F tiles shrink to
        # Q_BLOCK x F (long clips would not fit in registers otherwise).
        for q_start in tl.static_range(0, F_PAD, Q_BLOCK):
            qf = q_start + tl.arange(0, Q_BLOCK)
            qi = qf[None, :, None]
            q_mask = (r3 < N) & (qi < F) & (d3 < HEAD_DIM)
            q = _dot_operand(tl.load(Q + r3 * sqn + qi * sqf + chan * sqc, mask=q_mask, other=0.0), INTERPRETED)
            o = _dot_operand(tl.load(Out + r3 * son + qi * sof + chan, mask=q_mask, other=0.0), INTERPRETED)
            do = _dot_operand(tl.load(DOut + r3 * sdon + qi * sdof + chan * sdoc, mask=q_mask, other=0.0),
                              INTERPRETED)
            q2 = qf[None, :]
            # Padded rows and frames read lse = +inf, so their probabilities come out 0.
            lse = tl.load(Lse + (r2 * HEADS + head) * F + q2, mask=(r2 < N) & (q2 < F), other=float("inf"))
            # The probabilities exactly as the forward computed them.
            p = tl.exp2(_scores_log2(q, k, Bias, r3, qi, fj, head, N, F, sbn, sbh, sbi, sbj, qk_scale_log2,
                                     HAS_BIAS, INTERPRETED, INPUT_PRECISION) - lse[:, :, None])

            # dV += P^T dO ; dP = dO V^T ; dS = P * (dP - rowsum(dO * O)) ; dQ = dS K ; dK += dS^T Q
            dv += tl.dot(tl.permute(p.to(do.dtype), (0, 2, 1)), do, input_precision=INPUT_PRECISION)
            dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=INPUT_PRECISION)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=2)
            ds = p * (dp - delta[:, :, None])  # gradient w.r.t. the natural-unit score (and the bias)
            ds_op = ds.to(q.dtype)
            dq = tl.dot(ds_op, k, input_precision=INPUT_PRECISION) * scale
            dk += tl.dot(tl.permute(ds_op, (0, 2, 1)), q, input_precision=INPUT_PRECISION)
            tl.store(DQ + g_row + qi * (HEADS * HEAD_DIM) + chan, _for_store(dq, DQ, INTERPRETED), mask=q_mask)
            if BIAS_GRAD:
                _add_bias_grad(DBias, ds, r3, qf, N, F, head, sdbn, sdbh, F_PAD, BIAS_GRAD_PER_ROW)

        g_off = g_row + f3 * (HEADS * HEAD_DIM) + chan
        tl.store(DK + g_off, _for_store(dk * scale, DK, INTERPRETED), mask=tile_mask)
        tl.store(DV + g_off, _for_store(dv, DV, INTERPRETED), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _padded_dims(frames: int, head_dim: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16.
    return max(16, _next_pow2(frames)), max(16, _next_pow2(head_dim))


def _q_block(f_pad: int) -> int:
    return f_pad if f_pad < _BLOCKED_FROM_F_PAD else min(_Q_BLOCK, f_pad)


def _row_elems(f_pad: int, d_pad: int, backward: bool) -> int:
    """Live tile elements per row of a program (see the register budget above)."""
    q_block = _q_block(f_pad)
    tiles = 4 if backward else 2  # (k, v[, dk, dv]), (q, out[, dout, dq]), (s, p[, dP, dS])
    return tiles * (f_pad * d_pad + q_block * d_pad + q_block * f_pad)


def _pick_block_rows(n_rows: int, f_pad: int, d_pad: int, backward: bool, interpret: bool) -> tuple[int, int]:
    """Rows per program (a power of two) and warps per program."""
    row_elems = _row_elems(f_pad, d_pad, backward)
    per_thread = _BWD_ELEMS_PER_THREAD if backward else _FWD_ELEMS_PER_THREAD
    if interpret:
        bn = max(1, _INTERPRETER_TILE_ELEMS // (f_pad * max(d_pad, f_pad)))
    else:
        bn = max(1, per_thread * 32 * _MAX_WARPS // row_elems)
    bn = min(1 << (bn.bit_length() - 1), _next_pow2(n_rows))  # a power of two, no more than needed
    warps_needed = -(-bn * row_elems // (32 * per_thread))
    warps = min(_MAX_WARPS, max(4, _next_pow2(warps_needed)))
    return bn, warps


def _launch_config(q, heads, backward: bool):
    n, f, c = q.shape
    f_pad, d_pad = _padded_dims(f, c // heads)
    interpreted = interpreter_enabled()
    bn, warps = _pick_block_rows(n, f_pad, d_pad, backward=backward, interpret=interpreted)
    return dict(grid=(triton.cdiv(n, bn), heads), interpreted=interpreted,
                constexprs=dict(INTERPRETED=interpreted,
                                INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                BLOCK_N=bn, F_PAD=f_pad, D_PAD=d_pad, Q_BLOCK=_q_block(f_pad),
                                num_warps=warps, num_stages=1))


def launch_forward(q, k, v, bias4, heads, scale):
    n, f, c = q.shape
    out = torch.empty((n, f, c), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, heads, f), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    cfg = _launch_config(q, heads, backward=False)
    bias_t, bias_strides = bias_view(bias4, n, heads, f)
    q_, k_, v_, out_, bias_ = (interpreter_view(t, cfg["interpreted"]) for t in (q, k, v, out, bias_t))
    _temporal_attn_fwd_kernel[cfg["grid"]](
        q_, k_, v_, bias_ if bias_ is not None else q_, out_, lse,
        n, f, heads, c // heads,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, out.stride(0), out.stride(1),
        scale * reference.LOG2E,
        HAS_BIAS=bias_t is not None, **cfg["constexprs"],
    )
    return out, lse


def launch_backward(q, k, v, bias4, out, lse, dout, heads, scale, bias_needs_grad):
    n, f, c = q.shape
    dq, dk, dv = (torch.empty((n, f, c), dtype=q.dtype, device=q.device) for _ in range(3))
    dbias = (torch.zeros(bias_grad_shape(bias4, n, heads, f), dtype=torch.float32, device=q.device)
             if bias_needs_grad else q.new_empty(0, dtype=torch.float32))
    if n == 0:
        return dq, dk, dv, dbias
    cfg = _launch_config(q, heads, backward=True)
    bias_t, bias_strides = bias_view(bias4, n, heads, f)
    dout = dout.to(q.dtype)
    q_, k_, v_, bias_, out_, dout_, dq_, dk_, dv_ = (
        interpreter_view(t, cfg["interpreted"]) for t in (q, k, v, bias_t, out, dout, dq, dk, dv))
    per_row = bias_needs_grad and dbias.shape[0] != 1
    per_head = bias_needs_grad and dbias.shape[1] != 1
    _temporal_attn_bwd_kernel[cfg["grid"]](
        q_, k_, v_, bias_ if bias_ is not None else q_, out_, dout_, lse, dq_, dk_, dv_, dbias,
        n, f, heads, c // heads,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, out.stride(0), out.stride(1),
        *dout.stride(),
        dbias.stride(0) if per_row else 0, dbias.stride(1) if per_head else 0,
        scale * reference.LOG2E, scale,
        HAS_BIAS=bias_t is not None, BIAS_GRAD=bias_needs_grad, BIAS_GRAD_PER_ROW=per_row,
        **cfg["constexprs"],
    )
    return dq, dk, dv, dbias
