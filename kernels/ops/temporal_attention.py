"""Fused temporal attention: softmax(q k^T * scale + bias) v over the frame axis.

Video UNets attend over frames at every pixel: q, k, v are (N, F, C) with N = batch x height x
width (thousands to >65k), F = frames (<= 128, usually 16) and C = heads x head_dim. Each
(row, head) pair is a tiny F x F attention problem, so PyTorch's SDPA spends its time in launch
and layout overhead. Here one Triton program takes a block of BLOCK_N rows for one head, loads
the whole (BLOCK_N, F, head_dim) tiles once, and does everything in registers:

* forward keeps only the output and the per-row log-sum-exp (fp32, (N, heads, F));
* backward recomputes the probabilities from q, k and the log-sum-exp and writes dq, dk, dv
  (and d(bias) when the bias requires grad) in one pass; nothing of size N x heads x F x F is
  ever kept.

This file follows the kernels/ pattern: the ``@triton.jit`` kernels, a launcher that checks
shapes, dtypes and strides and picks block sizes, a ``torch.autograd.Function``, a plain-PyTorch
reference (the test oracle and the CPU path) and the public entry :func:`temporal_attention`,
which picks the implementation with :func:`fastvader.kernels._backend.active_backend`.

The diffusers attention processor that routes video models through this op, and its
``fastvader.apply`` patch, live in :mod:`fastvader.patching.temporal_attention` (they need
diffusers; this module does not).
"""
from __future__ import annotations

import torch

from fastvader.kernels._backend import active_backend, interpreter_enabled

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    _HAVE_TRITON = False

__all__ = [
    "temporal_attention",
    "temporal_attention_reference",
    "TemporalAttentionFunction",
    "kernel_supports",
    "MAX_FRAMES",
    "MAX_HEAD_DIM",
    "KERNEL_DTYPES",
]

MAX_FRAMES = 128
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634

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
# Triton kernels
# ----------------------------------------------------------------------------------------------
if _HAVE_TRITON:

    @triton.jit
    def _upcast(x, BF16_BITS: tl.constexpr):
        """fp32 copy of a loaded tile. With BF16_BITS (interpreter only) the tile holds bf16 bit
        patterns as int16, widened by moving bits: the interpreter's float conversions (also of
        a masked load's ``other``) are slow Python loops over every element."""
        if BF16_BITS:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return x.to(tl.float32)

    @triton.jit
    def _downcast(x, Ptr, BF16_BITS: tl.constexpr):
        """``x`` in the element type of ``Ptr``, for a store; with BF16_BITS, fp32 -> bf16 bit
        patterns (int16), rounded to nearest even."""
        if BF16_BITS:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        return x.to(Ptr.dtype.element_ty)

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
        BIAS_BF16_BITS: tl.constexpr,
        UPCAST: tl.constexpr,
        BF16_BITS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        F_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        Q_BLOCK: tl.constexpr,
    ):
        pid_n = tl.program_id(0)  # row block: axis 0 allows 2^31 - 1 programs, so any N works
        head = tl.program_id(1)

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        frames = tl.arange(0, F_PAD)
        dims = tl.arange(0, D_PAD)
        r3 = rows.to(tl.int64)[:, None, None]  # int64: N x row-stride can pass 2^31
        f3 = frames[None, :, None]
        d3 = dims[None, None, :]
        chan = head * HEAD_DIM + d3
        tile_mask = (r3 < N) & (f3 < F) & (d3 < HEAD_DIM)
        r2 = rows.to(tl.int64)[:, None]
        fj = frames[None, None, :]  # key frames

        k = tl.load(K + r3 * skn + f3 * skf + chan * skc, mask=tile_mask, other=0.0)
        v = tl.load(V + r3 * svn + f3 * svf + chan * svc, mask=tile_mask, other=0.0)
        if UPCAST:  # the interpreter multiplies raw bits for bf16 dots: compute in fp32 there
            k = _upcast(k, BF16_BITS)
            v = _upcast(v, BF16_BITS)

        # Every key frame is in registers, so each block of Q_BLOCK query frames takes an exact
        # softmax (no running maximum); blocks keep the Q_BLOCK x F tiles small for long clips.
        for q_start in tl.static_range(0, F_PAD, Q_BLOCK):
            qf = q_start + tl.arange(0, Q_BLOCK)
            qi = qf[None, :, None]
            q_mask = (r3 < N) & (qi < F) & (d3 < HEAD_DIM)
            q = tl.load(Q + r3 * sqn + qi * sqf + chan * sqc, mask=q_mask, other=0.0)
            if UPCAST:
                q = _upcast(q, BF16_BITS)

            # Scores in log2 units: s2 = (q k^T * scale + bias) * log2(e), so softmax uses exp2.
            s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=INPUT_PRECISION) * qk_scale_log2
            if HAS_BIAS:
                b_mask = (r3 < N) & (qi < F) & (fj < F)
                b = tl.load(Bias + r3 * sbn + head * sbh + qi * sbi + fj * sbj, mask=b_mask, other=0.0)
                s = s + _upcast(b, BIAS_BF16_BITS) * 1.4426950408889634
            s = tl.where(fj < F, s, float("-inf"))  # padded key frames take no weight

            m = tl.max(s, axis=2)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: avoid inf - inf
            p = tl.exp2(s - m_safe[:, :, None])
            l = tl.sum(p, axis=2)
            l_safe = tl.where(l == 0.0, 1.0, l)
            o = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) / l_safe[:, :, None]
            tl.store(Out + r3 * son + qi * sof + chan, _downcast(o, Out, BF16_BITS), mask=q_mask)

            # Fully masked rows store lse = +inf: the backward's exp2(s - lse) gives p = 0 there.
            lse = tl.where(l == 0.0, float("inf"), m_safe + tl.log2(l_safe))
            q2 = qf[None, :]
            tl.store(Lse + (r2 * HEADS + head) * F + q2, lse, mask=(r2 < N) & (q2 < F))

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
        BIAS_BF16_BITS: tl.constexpr,
        BIAS_GRAD: tl.constexpr,
        BIAS_GRAD_PER_ROW: tl.constexpr,
        UPCAST: tl.constexpr,
        BF16_BITS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        F_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        Q_BLOCK: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        head = tl.program_id(1)

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        frames = tl.arange(0, F_PAD)
        dims = tl.arange(0, D_PAD)
        r3 = rows.to(tl.int64)[:, None, None]
        f3 = frames[None, :, None]
        d3 = dims[None, None, :]
        chan = head * HEAD_DIM + d3
        tile_mask = (r3 < N) & (f3 < F) & (d3 < HEAD_DIM)
        r2 = rows.to(tl.int64)[:, None]
        fj = frames[None, None, :]  # key frames
        # dq/dk/dv are fresh contiguous (N, F, C) tensors: strides F*C, C, 1.
        g_row = r3 * F * (HEADS * HEAD_DIM)

        k = tl.load(K + r3 * skn + f3 * skf + chan * skc, mask=tile_mask, other=0.0)
        v = tl.load(V + r3 * svn + f3 * svf + chan * svc, mask=tile_mask, other=0.0)
        if UPCAST:
            k = _upcast(k, BF16_BITS)
            v = _upcast(v, BF16_BITS)
        dk = tl.zeros((BLOCK_N, F_PAD, D_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, F_PAD, D_PAD), dtype=tl.float32)

        # Query frames in blocks of Q_BLOCK: k, v, dk, dv stay whole, the F x F tiles shrink to
        # Q_BLOCK x F (long clips would not fit in registers otherwise).
        for q_start in tl.static_range(0, F_PAD, Q_BLOCK):
            qf = q_start + tl.arange(0, Q_BLOCK)
            qi = qf[None, :, None]
            q_mask = (r3 < N) & (qi < F) & (d3 < HEAD_DIM)
            q = tl.load(Q + r3 * sqn + qi * sqf + chan * sqc, mask=q_mask, other=0.0)
            o = tl.load(Out + r3 * son + qi * sof + chan, mask=q_mask, other=0.0)
            do = tl.load(DOut + r3 * sdon + qi * sdof + chan * sdoc, mask=q_mask, other=0.0)
            if UPCAST:
                q = _upcast(q, BF16_BITS)
                o = _upcast(o, BF16_BITS)
                do = _upcast(do, BF16_BITS)
            q2 = qf[None, :]
            # Padded rows and frames read lse = +inf, so their probabilities come out 0.
            lse = tl.load(Lse + (r2 * HEADS + head) * F + q2, mask=(r2 < N) & (q2 < F), other=float("inf"))

            # Recompute the probabilities exactly as the forward did.
            s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=INPUT_PRECISION) * qk_scale_log2
            if HAS_BIAS:
                b_mask = (r3 < N) & (qi < F) & (fj < F)
                b = tl.load(Bias + r3 * sbn + head * sbh + qi * sbi + fj * sbj, mask=b_mask, other=0.0)
                s = s + _upcast(b, BIAS_BF16_BITS) * 1.4426950408889634
            s = tl.where(fj < F, s, float("-inf"))
            p = tl.exp2(s - lse[:, :, None])

            # dV += P^T dO ; dP = dO V^T ; dS = P * (dP - rowsum(dO * O)) ; dQ = dS K ; dK += dS^T Q
            dv += tl.dot(tl.permute(p.to(do.dtype), (0, 2, 1)), do, input_precision=INPUT_PRECISION)
            dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=INPUT_PRECISION)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=2)
            ds = p * (dp - delta[:, :, None])  # gradient w.r.t. the natural-unit score (and the bias)
            ds_op = ds.to(q.dtype)
            dq = tl.dot(ds_op, k, input_precision=INPUT_PRECISION) * scale
            dk += tl.dot(tl.permute(ds_op, (0, 2, 1)), q, input_precision=INPUT_PRECISION)
            tl.store(DQ + g_row + qi * (HEADS * HEAD_DIM) + chan, _downcast(dq, DQ, BF16_BITS), mask=q_mask)

            if BIAS_GRAD:
                # DBias is an fp32 (Nb, Hb, F, F) buffer, Nb in {1, N} and Hb in {1, HEADS}; a
                # zero stride folds broadcast dims, and atomics add contributions sharing a slot.
                if BIAS_GRAD_PER_ROW:
                    tl.atomic_add(DBias + r3 * sdbn + head * sdbh + qi * F + fj, ds,
                                  mask=(r3 < N) & (qi < F) & (fj < F))
                else:
                    ds_sum = tl.sum(ds, axis=0)  # padded rows have p = 0, hence ds = 0
                    qi2 = qf[:, None]
                    fj2 = frames[None, :]
                    tl.atomic_add(DBias + head * sdbh + qi2 * F + fj2, ds_sum,
                                  mask=(qi2 < F) & (fj2 < F))

        g_off = g_row + f3 * (HEADS * HEAD_DIM) + chan
        tl.store(DK + g_off, _downcast(dk * scale, DK, BF16_BITS), mask=tile_mask)
        tl.store(DV + g_off, _downcast(dv, DV, BF16_BITS), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# Launcher
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


def _pick_block_rows(n_rows: int, f_pad: int, d_pad: int, backward: bool, interpret: bool,
                     block_rows: int | None = None) -> tuple[int, int]:
    """Rows per program (a power of two) and warps per program."""
    row_elems = _row_elems(f_pad, d_pad, backward)
    per_thread = _BWD_ELEMS_PER_THREAD if backward else _FWD_ELEMS_PER_THREAD
    if block_rows is not None:
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"block_rows must be a power of two >= 1, got {block_rows}")
        bn = block_rows
    else:
        if interpret:
            bn = max(1, _INTERPRETER_TILE_ELEMS // (f_pad * max(d_pad, f_pad)))
        else:
            bn = max(1, per_thread * 32 * _MAX_WARPS // row_elems)
        bn = 1 << (bn.bit_length() - 1)  # round down to a power of two
        bn = min(bn, _next_pow2(n_rows))
    warps_needed = -(-bn * row_elems // (32 * per_thread))
    warps = min(_MAX_WARPS, max(4, _next_pow2(warps_needed)))
    return bn, warps


def kernel_supports(q: torch.Tensor, heads: int) -> str | None:
    """None when the Triton kernel can take ``q`` (N, F, C) with ``heads`` heads, else why not."""
    if q.dim() != 3:
        return f"expected (N, F, C) tensors, got shape {tuple(q.shape)}"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernel (use float32, float16 or bfloat16)"
    n, f, c = q.shape
    if c % heads:
        return f"channels C={c} are not divisible by heads={heads}"
    if f > MAX_FRAMES:
        return f"F={f} frames exceeds the kernel's limit of {MAX_FRAMES}"
    if c // heads > MAX_HEAD_DIM:
        return f"head_dim={c // heads} exceeds the kernel's limit of {MAX_HEAD_DIM}"
    return None


def _check_inputs(q, k, v, heads):
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (N, F, C) = (batch*height*width, frames, channels); "
                             f"got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape (self-attention over frames); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] % heads:
        raise ValueError(f"channels C={q.shape[-1]} must be divisible by heads={heads}")


def _normalize_bias(bias: torch.Tensor | None, q: torch.Tensor, heads: int) -> torch.Tensor | None:
    """Additive float bias broadcastable to (N, heads, F, F); a bool mask (True = attend)
    becomes 0 / -inf."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor broadcastable to (N, heads, F, F), got {type(bias).__name__}")
    n, f, _ = q.shape
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    if bias.dim() > 4:
        raise ValueError(f"bias must have at most 4 dims (N, heads, F, F); got shape {tuple(bias.shape)}")
    try:
        torch.broadcast_shapes(bias.shape, (n, heads, f, f))
    except RuntimeError:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (N, heads, F, F) = "
                         f"{(n, heads, f, f)}") from None
    return bias


def _scale_for(q: torch.Tensor, heads: int, scale: float | None) -> float:
    return float(scale) if scale is not None else (q.shape[-1] // heads) ** -0.5


def _use_interpreter(device: torch.device) -> bool:
    # TRITON_INTERPRET=1 interprets every launch, CUDA tensors included: the bf16 workarounds
    # must follow the variable, not the device.
    return interpreter_enabled()


def _bias_view(bias4: torch.Tensor | None, n: int, heads: int, f: int):
    """(bias expanded to (N, heads, F, F), its four strides) - zero strides for broadcast dims."""
    if bias4 is None:
        return None, (0, 0, 0, 0)
    expanded = bias4.expand(n, heads, f, f)
    return expanded, tuple(expanded.stride())


def _as_bits(t: torch.Tensor | None, enabled: bool) -> torch.Tensor | None:
    """Under the interpreter, bf16 tensors go in as int16 views of the same memory (no copy);
    the kernel moves the bits itself (see ``_upcast``)."""
    if t is None or not enabled or t.dtype != torch.bfloat16:
        return t
    return t.view(torch.int16)


def _launch_forward(q, k, v, bias4, heads, scale, block_rows=None):
    n, f, c = q.shape
    head_dim = c // heads
    f_pad, d_pad = _padded_dims(f, head_dim)
    interpret = _use_interpreter(q.device)
    bn, warps = _pick_block_rows(n, f_pad, d_pad, backward=False, interpret=interpret, block_rows=block_rows)
    out = torch.empty((n, f, c), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, heads, f), dtype=torch.float32, device=q.device)
    bias_t, bstr = _bias_view(bias4, n, heads, f)
    if n == 0:
        return out, lse
    bits = interpret and q.dtype == torch.bfloat16
    bias_bits = interpret and bias_t is not None and bias_t.dtype == torch.bfloat16
    grid = (triton.cdiv(n, bn), heads)
    _temporal_attn_fwd_kernel[grid](
        _as_bits(q, bits), _as_bits(k, bits), _as_bits(v, bits),
        _as_bits(bias_t, bias_bits) if bias_t is not None else q,
        _as_bits(out, bits), lse,
        n, f, heads, head_dim,
        *q.stride(), *k.stride(), *v.stride(),
        *bstr,
        out.stride(0), out.stride(1),
        scale * _LOG2E,
        HAS_BIAS=bias_t is not None,
        UPCAST=interpret,
        BF16_BITS=bits,
        BIAS_BF16_BITS=bias_bits,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_N=bn, F_PAD=f_pad, D_PAD=d_pad, Q_BLOCK=_q_block(f_pad),
        num_warps=warps, num_stages=1,
    )
    return out, lse


def _launch_backward(q, k, v, bias4, out, lse, dout, heads, scale, bias_needs_grad, block_rows=None):
    n, f, c = q.shape
    head_dim = c // heads
    f_pad, d_pad = _padded_dims(f, head_dim)
    interpret = _use_interpreter(q.device)
    bn, warps = _pick_block_rows(n, f_pad, d_pad, backward=True, interpret=interpret, block_rows=block_rows)
    dq = torch.empty((n, f, c), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    bias_t, bstr = _bias_view(bias4, n, heads, f)
    dbias_buf = None
    per_row = False
    dbstr = (0, 0)
    if bias_needs_grad:
        # One gradient slot per row / head the bias actually has (by shape: a bias that is itself
        # an expanded view still gets a per-element gradient, as autograd expects).
        per_row = bias4.shape[0] != 1
        per_head = bias4.shape[1] != 1
        dbias_buf = torch.zeros((n if per_row else 1, heads if per_head else 1, f, f),
                                dtype=torch.float32, device=q.device)
        dbstr = (dbias_buf.stride(0) if per_row else 0, dbias_buf.stride(1) if per_head else 0)
    if n > 0:
        bits = interpret and q.dtype == torch.bfloat16
        bias_bits = interpret and bias_t is not None and bias_t.dtype == torch.bfloat16
        dout = dout.to(q.dtype)
        grid = (triton.cdiv(n, bn), heads)
        _temporal_attn_bwd_kernel[grid](
            *(_as_bits(t, bits) for t in (q, k, v)),
            _as_bits(bias_t, bias_bits) if bias_t is not None else q,
            *(_as_bits(t, bits) for t in (out, dout)), lse,
            *(_as_bits(t, bits) for t in (dq, dk, dv)),
            dbias_buf if dbias_buf is not None else lse,
            n, f, heads, head_dim,
            *q.stride(), *k.stride(), *v.stride(),
            *bstr,
            out.stride(0), out.stride(1),
            *dout.stride(),
            *dbstr,
            scale * _LOG2E, scale,
            HAS_BIAS=bias_t is not None,
            BIAS_GRAD=dbias_buf is not None,
            BIAS_GRAD_PER_ROW=per_row,
            UPCAST=interpret,
        BF16_BITS=bits,
        BIAS_BF16_BITS=bias_bits,
            INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_N=bn, F_PAD=f_pad, D_PAD=d_pad, Q_BLOCK=_q_block(f_pad),
            num_warps=warps, num_stages=1,
        )
    return dq, dk, dv, dbias_buf


class TemporalAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v (as given: views stay views), out and the fp32
    log-sum-exp; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, bias, heads, scale):
        bias4 = None
        if bias is not None:
            bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        out, lse = _launch_forward(q, k, v, bias4, heads, scale)
        ctx.heads = heads
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(q, k, v, bias4, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias4, out, lse = ctx.saved_tensors
        bias_needs_grad = bias4 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias_buf = _launch_backward(q, k, v, bias4, out, lse, dout, ctx.heads, ctx.scale,
                                                 bias_needs_grad)
        dbias = None
        if dbias_buf is not None:
            dbias = dbias_buf.sum_to_size(bias4.shape).reshape(ctx.bias_shape).to(ctx.bias_dtype)
        return dq, dk, dv, dbias, None, None


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def temporal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                 scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch attention over frames: the test oracle (run it in float64) and the CPU path.

    Half-precision inputs are computed in fp32 and the result cast back, like the kernel.
    Autograd flows through it to q, k, v and the bias. Rows whose every key is masked with
    -inf give NaN here (softmax of all -inf) and zeros in the kernel.
    """
    _check_inputs(q, k, v, heads)
    bias = _normalize_bias(bias, q, heads)
    scale = _scale_for(q, heads, scale)
    n, f, c = q.shape
    hd = c // heads
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    def split(t):  # (N, F, C) -> (N, heads, F, hd)
        return t.to(compute).reshape(n, f, heads, hd).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(compute)
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ split(v)).transpose(1, 2).reshape(n, f, c)
    return out.to(q.dtype)


def _temporal_attention_sdpa(q, k, v, heads, scale, bias):
    """The PyTorch path of :func:`temporal_attention` (CPU without the interpreter, or no
    triton): SDPA on head-split views, same semantics as the reference (several times faster
    than it on CPU, where SDPA has a fused kernel)."""
    n, f, c = q.shape

    def split(t):  # (N, F, C) -> (N, heads, F, hd), a view
        return t.view(n, f, heads, c // heads).transpose(1, 2) if t.stride(-1) == 1 else \
            t.reshape(n, f, heads, c // heads).transpose(1, 2)

    mask = None if bias is None else bias.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                                           scale=scale)
    return out.transpose(1, 2).reshape(n, f, c)


# ----------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------
def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention over frames.

    Args:
        q, k, v: (N, F, C) tensors, C = heads x head_dim, any stride (views into a packed
            (N, F, 3C) qkv tensor are read in place, without a copy).
        heads: number of heads.
        scale: score scale; default head_dim ** -0.5.
        bias: optional additive float bias (or bool mask, True = attend) broadcastable to
            (N, heads, F, F); it gets a gradient when it requires one.

    Returns:
        (N, F, C) contiguous output in the dtype of q.

    Runs the Triton kernel on CUDA tensors (and under the Triton interpreter on CPU when
    TRITON_INTERPRET=1); otherwise PyTorch's SDPA with the reference's semantics. On the Triton path, inputs the kernel
    cannot take (F > 128, head_dim > 256, float64) raise ValueError: call
    :func:`temporal_attention_reference` for those.
    """
    _check_inputs(q, k, v, heads)
    bias = _normalize_bias(bias, q, heads)
    scale = _scale_for(q, heads, scale)
    backend = active_backend(q.device)
    if backend == "reference":
        return _temporal_attention_sdpa(q, k, v, heads, scale, bias)
    why_not = kernel_supports(q, heads)
    if why_not is not None:
        raise ValueError(f"temporal_attention ({backend} path): {why_not}; "
                         "use temporal_attention_reference for such inputs")
    return TemporalAttentionFunction.apply(q, k, v, bias, heads, scale)
