"""Fused temporal attention: softmax(q k^T * scale + bias) v over the frame axis, as the torch
ops ``fastvader::temporal_attention_fwd`` / ``_bwd`` (training) and ``_infer`` (no gradients).

Video UNets attend over frames at every pixel: q, k, v are (N, F, C) with N = batch x height x
width (thousands to >100k), F = frames (<= 128, usually 16) and C = heads x head_dim. Each
(row, head) pair is a tiny F x F attention problem.

Kernel generation v2 (this file) sees one head as block-diagonal attention over the flattened
(N*F, head_dim) matrix: a program takes a tile of BLOCK_R consecutive rows holding CLIPS whole
clips (BLOCK_R // F; e.g. 128 rows = 8 clips at F = 16) and does one masked 2-D ``tl.dot`` per
product (tensor cores; entries between different clips are masked to -inf, so their
probabilities are exactly 0):

* forward: S = Q K^T over head_dim in chunks of D_CHUNK (no power-of-two padding of head_dim
  beyond the chunk), an exact row softmax (every key of a row is in the tile), O = P V chunk by
  chunk; it keeps the output and, when gradients are needed, the fp32 log2-sum-exp per row;
* backward: S and dP = dO V^T and Delta = rowsum(dO * O) over head_dim, then dV = P^T dO,
  dQ = dS K, dK = dS^T Q per chunk: plain 2-D dots, and since a tile owns its clips whole, every
  gradient row is written once, without atomics. The bias gradient too: per clip straight from
  dS, or, for a bias broadcast over clips, one (F, F) sum per tile (two one-hot dots) that the
  host adds up;
* heads are the fastest grid axis (neighbouring programs read neighbouring channels of the
  same rows); the launch configuration (rows per tile, head_dim chunk, warps, pipeline stages)
  is measured per (F, head_dim, dtype, bias) on first use and cached (``_autotune``).

Generation v1 (``temporal_attention_v1.py``, measured on an H200) stays reachable with
``FASTVADER_KERNEL_IMPL=v1``. Where Triton cannot run (CPU without TRITON_INTERPRET=1, or no
triton) the ops run the plain-PyTorch forward and backward of :mod:`fastvader.kernels.reference`,
which keep the same tensors. The diffusers processor that routes video models through this op
lives in :mod:`fastvader.patching.temporal_attention`.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastvader.kernels import reference
from fastvader.kernels._autotune import Autotuner, LaunchConfig, launch_config
from fastvader.kernels._backend import active_backend, autotune_enabled, interpreter_enabled, kernel_impl
from fastvader.kernels._checks import (
    attention_bias,
    attention_scale,
    bias_grad_shape,
    bias_view,
    check_attention,
)
from fastvader.kernels._interpreted import interpreter_view
from fastvader.kernels.ops import temporal_attention_v1

from fastvader.kernels._triton import HAS_TRITON as _HAS_TRITON, tl, triton

__all__ = ["temporal_attention", "temporal_attention_supports", "MAX_FRAMES", "MAX_HEAD_DIM", "KERNEL_DTYPES"]

MAX_FRAMES = 128
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bias-gradient modes of the backward kernel.
_NO_BIAS_GRAD, _BIAS_GRAD_PER_CLIP, _BIAS_GRAD_PER_TILE = 0, 1, 2

# Measured launch configurations (a cache; results never depend on it).
FORWARD_TUNER = Autotuner("temporal_attention_fwd")
BACKWARD_TUNER = Autotuner("temporal_attention_bwd")


# ----------------------------------------------------------------------------------------------
# Triton kernels (INTERPRETED: the one switch for interpreter-only code, fastvader.kernels._interpreted)
# ----------------------------------------------------------------------------------------------
if _HAS_TRITON:
    from fastvader.kernels._interpreted import dot_operand, for_store, probs_operand, to_fp32

    @triton.jit
    def _tile_rows(N, HEADS, F: tl.constexpr, CLIPS: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's head and tile, and for each of the tile's rows of the flattened (N*F)
        matrix: its clip within the tile, its clip index n and frame f (int64: N x the row stride
        can pass 2^31), and whether it exists (CLIPS * F <= BLOCK_R; the last tile may be short)."""
        pid = tl.program_id(0)  # axis 0 allows 2^31 - 1 programs: any N
        head = pid % HEADS
        tile = pid // HEADS
        i = tl.arange(0, BLOCK_R)
        clip = i // F
        n = tile.to(tl.int64) * CLIPS + clip
        f = (i - clip * F).to(tl.int64)
        return head, tile, clip, n, f, (clip < CLIPS) & (n < N)

    @triton.jit
    def _load_cols(Ptr, rows, valid, col0, head, stride_c, HEAD_DIM: tl.constexpr,
                   D_CHUNK: tl.constexpr, INTERPRETED: tl.constexpr):
        """The (rows, D_CHUNK) tile of one head's channels col0.. of an (N, F, C) tensor, as a dot
        operand; zeros past head_dim and on missing rows."""
        d = col0 + tl.arange(0, D_CHUNK)
        ptrs = Ptr + rows[:, None] + ((head * HEAD_DIM + d) * stride_c)[None, :]
        return dot_operand(tl.load(ptrs, mask=valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0), INTERPRETED)

    @triton.jit
    def _store_cols(Ptr, rows, valid, col0, head, x, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
                    INTERPRETED: tl.constexpr):
        """Store a (rows, D_CHUNK) tile into one head's channels col0.. of a contiguous (N, F, C)."""
        d = col0 + tl.arange(0, D_CHUNK)
        tl.store(Ptr + rows[:, None] + (head * HEAD_DIM + d)[None, :], for_store(x, Ptr, INTERPRETED),
                 mask=valid[:, None] & (d < HEAD_DIM)[None, :])

    @triton.jit
    def _scores_log2(Q, K, Bias, q_rows, k_rows, clip, n, f, valid, head, sqc, skc, sbn, sbh, sbi, sbj,
                     qk_scale_log2, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
                     HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """The tile's (BLOCK_R, BLOCK_R) scores in log2 units ((q k^T * scale + bias) * log2(e), so
        softmax takes exp2), -inf between different clips and on missing keys."""
        s = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for col0 in range(0, HEAD_DIM, D_CHUNK):
            q = _load_cols(Q, q_rows, valid, col0, head, sqc, HEAD_DIM, D_CHUNK, INTERPRETED)
            k = _load_cols(K, k_rows, valid, col0, head, skc, HEAD_DIM, D_CHUNK, INTERPRETED)
            s = tl.dot(q, tl.trans(k), s, input_precision=INPUT_PRECISION)
        s = s * qk_scale_log2
        same_clip = (clip[:, None] == clip[None, :]) & valid[None, :]
        if HAS_BIAS:  # entries of one clip: key j's frame against query i's, at query i's row
            b_ptrs = Bias + n[:, None] * sbn + head * sbh + f[:, None] * sbi + f[None, :] * sbj
            b = tl.load(b_ptrs, mask=same_clip & valid[:, None], other=0.0)
            s += to_fp32(b, INTERPRETED) * 1.4426950408889634
        return tl.where(same_clip, s, float("-inf"))

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Bias, Out, Lse, N, HEADS,
        sqn, sqf, sqc, skn, skf, skc, svn, svf, svc, sbn, sbh, sbi, sbj,
        qk_scale_log2,
        F: tl.constexpr, HEAD_DIM: tl.constexpr, CLIPS: tl.constexpr, BLOCK_R: tl.constexpr,
        D_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_LSE: tl.constexpr,
        INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        head, _, clip, n, f, valid = _tile_rows(N, HEADS, F, CLIPS, BLOCK_R)
        s = _scores_log2(Q, K, Bias, n * sqn + f * sqf, n * skn + f * skf, clip, n, f, valid, head,
                         sqc, skc, sbn, sbh, sbi, sbj, qk_scale_log2, HEAD_DIM, D_CHUNK, BLOCK_R,
                         HAS_BIAS, INTERPRETED, INPUT_PRECISION)
        # Every key of a row is in the tile: an exact softmax, no running maximum.
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: avoid inf - inf
        p = tl.exp2(s - m_safe[:, None])
        l = tl.sum(p, axis=1)
        l_safe = tl.where(l == 0.0, 1.0, l)
        inv_l = 1.0 / l_safe
        p_op = probs_operand(p, V, INTERPRETED)
        out_rows = (n * F + f) * (HEADS * HEAD_DIM)  # out is a fresh contiguous (N, F, C)
        for col0 in range(0, HEAD_DIM, D_CHUNK):
            v = _load_cols(V, n * svn + f * svf, valid, col0, head, svc, HEAD_DIM, D_CHUNK, INTERPRETED)
            o = tl.dot(p_op, v, input_precision=INPUT_PRECISION) * inv_l[:, None]
            _store_cols(Out, out_rows, valid, col0, head, o, HEAD_DIM, D_CHUNK, INTERPRETED)
        if STORE_LSE:
            # Fully masked rows store lse = +inf: the backward's exp2(s - lse) gives p = 0 there.
            lse = tl.where(l == 0.0, float("inf"), m_safe + tl.log2(l_safe))
            tl.store(Lse + (n * HEADS + head) * F + f, lse, mask=valid)

    @triton.jit
    def _store_bias_grad(DBias, ds, clip, n, f, valid, head, tile, HEADS, F: tl.constexpr,
                         F_PAD: tl.constexpr, MODE: tl.constexpr):
        """Write d(scores) as the bias gradient into an fp32 buffer of (slots, HEADS, F, F): per
        clip (slots = N), or summed over the tile's clips (slots = tiles) with two one-hot dots,
        E dS E^T with E[a, i] = (frame of row i == a): dS is zero between different clips."""
        if MODE == 1:
            same_clip = (clip[:, None] == clip[None, :]) & valid[:, None] & valid[None, :]
            slot = ((n * HEADS + head) * F + f) * F
            tl.store(DBias + slot[:, None] + f[None, :], ds, mask=same_clip)
        else:
            a = tl.arange(0, F_PAD)
            onehot = ((a[:, None] == f[None, :]) & valid[None, :]).to(tl.float32)  # (F_PAD, BLOCK_R)
            per_frames = tl.dot(tl.dot(onehot, ds, input_precision="ieee"), tl.trans(onehot),
                                input_precision="ieee")
            base = DBias + (tile.to(tl.int64) * HEADS + head) * F * F
            tl.store(base + a[:, None] * F + a[None, :], per_frames, mask=(a[:, None] < F) & (a[None, :] < F))

    @triton.jit
    def _attn_bwd_kernel(
        Q, K, V, Bias, Out, DOut, Lse, DQ, DK, DV, DBias, N, HEADS,
        sqn, sqf, sqc, skn, skf, skc, svn, svf, svc, sbn, sbh, sbi, sbj, sdon, sdof, sdoc,
        qk_scale_log2, scale,
        F: tl.constexpr, HEAD_DIM: tl.constexpr, CLIPS: tl.constexpr, BLOCK_R: tl.constexpr,
        D_CHUNK: tl.constexpr, F_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
        INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        head, tile, clip, n, f, valid = _tile_rows(N, HEADS, F, CLIPS, BLOCK_R)
        q_rows, k_rows = n * sqn + f * sqf, n * skn + f * skf
        v_rows, do_rows = n * svn + f * svf, n * sdon + f * sdof
        out_rows = (n * F + f) * (HEADS * HEAD_DIM)  # out, dq, dk, dv: contiguous (N, F, C)
        s = _scores_log2(Q, K, Bias, q_rows, k_rows, clip, n, f, valid, head, sqc, skc, sbn, sbh, sbi, sbj,
                         qk_scale_log2, HEAD_DIM, D_CHUNK, BLOCK_R, HAS_BIAS, INTERPRETED, INPUT_PRECISION)
        # dP = dO V^T and Delta = rowsum(dO * O), reduced over head_dim like the scores.
        dp = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        delta = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for col0 in range(0, HEAD_DIM, D_CHUNK):
            do = _load_cols(DOut, do_rows, valid, col0, head, sdoc, HEAD_DIM, D_CHUNK, INTERPRETED)
            v = _load_cols(V, v_rows, valid, col0, head, svc, HEAD_DIM, D_CHUNK, INTERPRETED)
            o = _load_cols(Out, out_rows, valid, col0, head, 1, HEAD_DIM, D_CHUNK, INTERPRETED)
            dp = tl.dot(do, tl.trans(v), dp, input_precision=INPUT_PRECISION)
            delta += tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        # The probabilities exactly as the forward computed them; missing rows read lse = +inf,
        # so theirs are 0.
        lse = tl.load(Lse + (n * HEADS + head) * F + f, mask=valid, other=float("inf"))
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])  # d(loss)/d(natural-unit score), = d(loss)/d(bias)
        if BIAS_GRAD != 0:
            _store_bias_grad(DBias, ds, clip, n, f, valid, head, tile, HEADS, F, F_PAD, BIAS_GRAD)
        p_op = probs_operand(p, Q, INTERPRETED)
        ds_op = probs_operand(ds, Q, INTERPRETED)
        for col0 in range(0, HEAD_DIM, D_CHUNK):
            do = _load_cols(DOut, do_rows, valid, col0, head, sdoc, HEAD_DIM, D_CHUNK, INTERPRETED)
            dv = tl.dot(tl.trans(p_op), do, input_precision=INPUT_PRECISION)
            _store_cols(DV, out_rows, valid, col0, head, dv, HEAD_DIM, D_CHUNK, INTERPRETED)
            k = _load_cols(K, k_rows, valid, col0, head, skc, HEAD_DIM, D_CHUNK, INTERPRETED)
            dq = tl.dot(ds_op, k, input_precision=INPUT_PRECISION) * scale
            _store_cols(DQ, out_rows, valid, col0, head, dq, HEAD_DIM, D_CHUNK, INTERPRETED)
            q = _load_cols(Q, q_rows, valid, col0, head, sqc, HEAD_DIM, D_CHUNK, INTERPRETED)
            dk = tl.dot(tl.trans(ds_op), q, input_precision=INPUT_PRECISION) * scale
            _store_cols(DK, out_rows, valid, col0, head, dk, HEAD_DIM, D_CHUNK, INTERPRETED)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


_CHUNKS = (16, 32, 64, 128)  # tl.dot needs every dimension >= 16
_TILE_ROWS = (32, 64, 128)
# Under the interpreter every program costs ~2 ms of Python per nested call: tiles of up to 128
# rows (larger ones cost more per row in numpy).
_INTERPRETER_MAX_ROWS = 128


def _chunk_choices(head_dim: int) -> tuple[int, int]:
    """(narrow, wide) head_dim chunks that pad head_dim least (40 -> 16; 80 -> 16; 160 -> 16 or
    32; 64 -> 16 or 64). Narrow chunks keep few registers live (compiled for sm_90, backward,
    64-row tiles: ~128 registers in chunks of 16 against 255 and spills for one chunk of 128 at
    head_dim 80); wide ones take fewer, larger dots."""
    padded = {c: -(-head_dim // c) * c for c in _CHUNKS}
    least = [c for c in _CHUNKS if padded[c] == min(padded.values())]
    return least[0], least[-1]


def _rows_choices(frames: int) -> list[int]:
    """Rows per tile worth trying: powers of two holding at least one clip, each filled to at
    least half with whole clips (F = 33: 128 rows hold 3 clips, 64 only one)."""
    fits = [r for r in _TILE_ROWS if r >= frames]
    good = [r for r in fits if (r // frames) * frames * 2 >= r]
    return good or fits[-1:]


def _candidates(frames: int, head_dim: int, n: int, interpreted: bool, backward: bool = False) -> list[LaunchConfig]:
    """Launch configurations for one (F, head_dim) and direction; the first is the heuristic
    choice. At most four, so autotuning a key costs a few seconds of compiling. Rows per tile
    trade the block-diagonal waste (R x R products for R/F clips of F x F) against the
    programs' count; every live R x R or R x chunk tile costs registers (sm_90 figures in
    docs/temporal_attention.md)."""
    if interpreted:  # few, large programs; one configuration
        rows = max(16, _next_pow2(frames), min(_INTERPRETER_MAX_ROWS, _next_pow2(n * frames)))
        return [launch_config(4, BLOCK_R=rows, D_CHUNK=max(16, _next_pow2(head_dim)))]
    narrow, wide = _chunk_choices(head_dim)
    rows = _rows_choices(frames)
    default_rows = 64 if 64 in rows else rows[-1]

    def config(r: int, chunk: int) -> LaunchConfig:
        warps = 4 if r == 32 or (r == 64 and not backward) else 8
        stages = 1 if chunk >= head_dim else 2  # a pipelined loop only when there are chunks
        return launch_config(warps, stages, BLOCK_R=r, D_CHUNK=chunk)

    wide_rows = 32 if backward and 32 in rows else default_rows
    picks = [(default_rows, narrow)] + [(r, narrow) for r in rows if r != default_rows] + [(wide_rows, wide)]
    return list(dict.fromkeys(config(r, c) for r, c in picks))[:4]


def _pick(tuner: Autotuner, key, candidates: list[LaunchConfig], launch) -> LaunchConfig:
    """The tuned configuration for ``key``; measuring launches ``launch(cfg)`` repeatedly (the
    kernels only write their outputs, so repeats are harmless). Never measures while a CUDA graph
    is being captured: the heuristic choice then."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def measure(cfg: LaunchConfig) -> float:
        return triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25)

    return tuner.pick(key, candidates, measure, tune=autotune_enabled() and not capturing)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _common_args(q, k, v, bias4, heads):
    """Inputs as the kernels take them (interpreted bf16 as int16 bits), their strides, and the
    constexprs every launch shares."""
    n, f, c = q.shape
    interpreted = interpreter_enabled()
    bias_t, bias_strides = bias_view(bias4, n, heads, f)
    tensors = [interpreter_view(t, interpreted) for t in (q, k, v)]
    tensors.append(interpreter_view(bias_t, interpreted) if bias_t is not None else tensors[0])
    strides = (*q.stride(), *k.stride(), *v.stride(), *bias_strides)
    constexprs = dict(F=f, HEAD_DIM=c // heads, HAS_BIAS=bias_t is not None, INTERPRETED=interpreted,
                      INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return tensors, strides, constexprs


def _grid(n: int, frames: int, heads: int, cfg: LaunchConfig) -> tuple[int]:
    return (triton.cdiv(n, cfg["BLOCK_R"] // frames) * heads,)


def _launch_forward(q, k, v, bias4, heads, scale, store_lse=True, config: LaunchConfig | None = None):
    """(out, lse): lse is empty when ``store_lse`` is False (nothing will need gradients)."""
    n, f, c = q.shape
    out = torch.empty((n, f, c), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, heads, f) if store_lse else (0,), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    (q_, k_, v_, bias_), strides, constexprs = _common_args(q, k, v, bias4, heads)
    out_ = interpreter_view(out, constexprs["INTERPRETED"])

    def launch(cfg: LaunchConfig):
        _attn_fwd_kernel[_grid(n, f, heads, cfg)](
            q_, k_, v_, bias_, out_, lse, n, heads, *strides, scale * reference.LOG2E,
            CLIPS=cfg["BLOCK_R"] // f, STORE_LSE=store_lse, **cfg.launch_kwargs(), **constexprs)

    key = (f, c // heads, q.dtype, constexprs["HAS_BIAS"])
    candidates = _candidates(f, c // heads, n, constexprs["INTERPRETED"])
    cfg = config or _pick(FORWARD_TUNER, key, candidates, launch)
    launch(cfg)
    return out, lse


def _bias_grad_mode(bias4, bias_needs_grad: bool) -> int:
    if not bias_needs_grad:
        return _NO_BIAS_GRAD
    return _BIAS_GRAD_PER_CLIP if bias4.shape[0] != 1 else _BIAS_GRAD_PER_TILE


def _launch_backward(q, k, v, bias4, out, lse, dout, heads, scale, bias_needs_grad,
                     config: LaunchConfig | None = None):
    """(dq, dk, dv, dbias), dbias summed to ``bias_grad_shape`` (empty without a bias gradient)."""
    n, f, c = q.shape
    dq, dk, dv = (torch.empty((n, f, c), dtype=q.dtype, device=q.device) for _ in range(3))
    mode = _bias_grad_mode(bias4, bias_needs_grad)
    if n == 0:
        shape = bias_grad_shape(bias4, n, heads, f) if mode else (0,)
        return dq, dk, dv, torch.zeros(shape, dtype=torch.float32, device=q.device)
    (q_, k_, v_, bias_), strides, constexprs = _common_args(q, k, v, bias4, heads)
    dout = dout.to(q.dtype)
    out_, dout_, dq_, dk_, dv_ = (interpreter_view(t, constexprs["INTERPRETED"]) for t in (out, dout, dq, dk, dv))

    def launch(cfg: LaunchConfig) -> torch.Tensor:
        tiles = triton.cdiv(n, cfg["BLOCK_R"] // f)
        slots = {_NO_BIAS_GRAD: 0, _BIAS_GRAD_PER_CLIP: n, _BIAS_GRAD_PER_TILE: tiles}[mode]
        dbias = torch.empty((slots, heads, f, f), dtype=torch.float32, device=q.device)
        _attn_bwd_kernel[_grid(n, f, heads, cfg)](
            q_, k_, v_, bias_, out_, dout_, lse, dq_, dk_, dv_, dbias, n, heads, *strides, *dout.stride(),
            scale * reference.LOG2E, scale,
            CLIPS=cfg["BLOCK_R"] // f, BIAS_GRAD=mode, F_PAD=max(16, _next_pow2(f)), **cfg.launch_kwargs(),
            **constexprs)
        return dbias

    key = (f, c // heads, q.dtype, constexprs["HAS_BIAS"], mode)
    candidates = _candidates(f, c // heads, n, constexprs["INTERPRETED"], backward=True)
    cfg = config or _pick(BACKWARD_TUNER, key, candidates, launch)
    dbias = launch(cfg)
    if mode == _NO_BIAS_GRAD:
        return dq, dk, dv, dbias.new_empty(0)
    # rows and heads the bias broadcasts over: summed here, deterministically
    return dq, dk, dv, dbias.sum_to_size(bias_grad_shape(bias4, n, heads, f))


def temporal_attention_supports(q: torch.Tensor, heads: int) -> str | None:
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


# ----------------------------------------------------------------------------------------------
# The torch ops: fastvader::temporal_attention_fwd, _bwd (training) and _infer (no gradients)
# ----------------------------------------------------------------------------------------------
def _runs_triton(device: torch.device) -> bool:
    return _HAS_TRITON and active_backend(device) != "reference"


@torch.library.custom_op("fastvader::temporal_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                   heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (N, F, C) contiguous, lse (N, heads, F) fp32 in log2 units. ``bias`` is
    four-dimensional, broadcasting to (N, heads, F, F)."""
    if not _runs_triton(q.device):
        return reference.temporal_attention_forward(q, k, v, bias, heads, scale)
    if kernel_impl() == "v1":
        return temporal_attention_v1.launch_forward(q, k, v, bias, heads, scale)
    return _launch_forward(q, k, v, bias, heads, scale)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, heads, scale):
    n, f, c = q.shape
    return q.new_empty((n, f, c)), q.new_empty((n, heads, f), dtype=torch.float32)


@torch.library.custom_op("fastvader::temporal_attention_infer", mutates_args=())
def _attention_infer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     heads: int, scale: float) -> torch.Tensor:
    """The forward when nothing needs gradients: the output only, no log-sum-exp stored."""
    if not _runs_triton(q.device):
        return reference.temporal_attention_forward(q, k, v, bias, heads, scale)[0]
    if kernel_impl() == "v1":
        return temporal_attention_v1.launch_forward(q, k, v, bias, heads, scale)[0]
    return _launch_forward(q, k, v, bias, heads, scale, store_lse=False)[0]


@_attention_infer.register_fake
def _attention_infer_fake(q, k, v, bias, heads, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("fastvader::temporal_attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, heads: int,
                   scale: float, bias_needs_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias): dbias is the fp32 gradient summed over the rows and heads the bias
    broadcasts over (see ``bias_grad_shape``), or empty when ``bias_needs_grad`` is False."""
    if _runs_triton(q.device):
        if kernel_impl() == "v1":
            return temporal_attention_v1.launch_backward(q, k, v, bias, out, lse, dout, heads, scale, bias_needs_grad)
        return _launch_backward(q, k, v, bias, out, lse, dout, heads, scale, bias_needs_grad)
    dq, dk, dv, dscores = reference.temporal_attention_backward(dout, q, k, v, bias, out, lse, heads, scale)
    if not bias_needs_grad:
        return dq, dk, dv, dscores.new_empty(0)
    n, f, _ = q.shape
    return dq, dk, dv, dscores.sum_to_size(bias_grad_shape(bias, n, heads, f))


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, bias, out, lse, heads, scale, bias_needs_grad):
    n, f, _ = q.shape
    dbias_shape = bias_grad_shape(bias, n, heads, f) if bias_needs_grad else (0,)
    return (*(q.new_empty(q.shape) for _ in range(3)), q.new_empty(dbias_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # q, k, v as given (views stay views), out and the fp32 log-sum-exp: nothing N x F x F.
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    bias_needs_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_bwd(dout, q, k, v, bias, out, lse, ctx.heads, ctx.scale, bias_needs_grad)
    dbias = dbias.sum_to_size(bias.shape).to(bias.dtype) if bias_needs_grad else None
    return dq, dk, dv, dbias, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    TRITON_INTERPRET=1); otherwise the same op in plain PyTorch. When nothing needs gradients
    (grad mode off, or no input requiring grad) it takes the inference op, which stores no
    log-sum-exp. On the Triton path, inputs the kernel cannot take (F > 128, head_dim > 256,
    float64) raise ValueError: call :func:`fastvader.kernels.temporal_attention_reference` for those.
    """
    check_attention(q, k, v, heads)
    bias4 = attention_bias(bias, q, heads)
    if _runs_triton(q.device):
        why_not = temporal_attention_supports(q, heads)
        if why_not is not None:
            raise ValueError(f"temporal_attention ({active_backend(q.device)} path): {why_not}; "
                             "use temporal_attention_reference for such inputs")
    scale = attention_scale(q, heads, scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias4)):
        return _attention_fwd(q, k, v, bias4, heads, scale)[0]
    return _attention_infer(q, k, v, bias4, heads, scale)
