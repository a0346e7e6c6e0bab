"""How the GroupNorm kernels (v1 and v2) address an (N, C, *spatial) tensor in place: the host
side (:class:`Layout`: sample and channel strides, the spatial dims merged into an (outer,
inner) pair of strided runs) and the ``@triton.jit`` helpers for (channels x spatial) tiles."""
from __future__ import annotations

import math

import torch

from fastvader.kernels._triton import tl, triton


class Layout:
    """How the kernels address an (N, C, *spatial) tensor: strides of the sample and channel
    dims, and the spatial dims merged into an (outer, inner) pair of runs."""

    def __init__(self, x: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        self.stride_n, self.stride_c = x.stride(0), x.stride(1)
        runs = merge_runs(list(x.shape[2:]), list(x.stride()[2:]))
        if len(runs) > 2:
            raise ValueError("spatial dims do not merge into two strided runs")
        if not runs:
            runs = [(1, 1, ())]
        if len(runs) == 1:
            runs = [(1, 0, ())] + runs
        (self.S_outer, self.stride_so, outer_dims), (self.S_inner, self.stride_si, inner_dims) = runs
        # the spatial dims (as dims of x) each run merges, for addressing another tensor this way
        self.run_dims = (tuple(d + 2 for d in outer_dims), tuple(d + 2 for d in inner_dims))
        self.split_s = self.S_outer > 1
        # The memory-contiguous axis decides the tile orientation (coalesced loads).
        self.c_fast = self.stride_c == 1 and self.C > 1 and self.stride_si != 1

    def strides(self) -> tuple[int, int, int, int]:
        """(sample, channel, outer run, inner run) strides of the tensor this layout describes."""
        return self.stride_n, self.stride_c, self.stride_so, self.stride_si

    def strides_of(self, t: torch.Tensor) -> tuple[int, int, int, int] | None:
        """The same four strides for ``t`` (x's shape, other strides), addressed through this
        layout's runs; None when the dims a run merges do not chain in ``t``."""
        run_strides = []
        for dims in self.run_dims:
            for outer, inner in zip(dims, dims[1:]):
                if t.stride(outer) != t.stride(inner) * t.shape[inner]:
                    return None
            run_strides.append(t.stride(dims[-1]) if dims else 0)
        return (t.stride(0), t.stride(1), *run_strides)


def merge_runs(sizes: list[int], strides: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
    """Merge adjacent dims whose strides chain, dropping size-1 dims: [(size, stride, dims), ...]
    with ``dims`` the indices (into ``sizes``) of the dims a run merges."""
    runs: list[tuple[int, int, tuple[int, ...]]] = []
    for dim, (size, stride) in enumerate(zip(sizes, strides)):
        if size == 1:
            continue
        if runs and runs[-1][1] == stride * size:
            prev_size, _, dims = runs[-1]
            runs[-1] = (prev_size * size, stride, dims + (dim,))
        else:
            runs.append((size, stride, (dim,)))
    return runs


def addressable_in_place(x: torch.Tensor) -> bool:
    """True when the kernels can address ``x`` itself and its elements fill its storage span
    exactly once (some permutation of a contiguous tensor), so an output can share its strides."""
    try:
        Layout(x)
    except ValueError:
        return False
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides the kernels read ``x`` with, which every x-shaped output of the ops takes:
    x's own, or contiguous ones when x must be copied first."""
    if addressable_in_place(x):
        return tuple(x.stride())
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def with_strides(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.stride()) == tuple(strides):
        return t
    out = t.new_empty_strided(t.shape, strides)
    out.copy_(t)
    return out


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def tile_offsets(c_idx, s_idx, C_HI, S_HI, stride_c, stride_so, stride_si, S_INNER,
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
    def per_channel(v, C_FAST: tl.constexpr):
        """Broadcast a per-channel vector against a tile."""
        if C_FAST:
            return v[None, :]
        else:
            return v[:, None]

    @triton.jit
    def channel_sum(t, C_FAST: tl.constexpr):
        """Reduce a tile over its spatial axis, leaving one value per channel."""
        if C_FAST:
            return tl.sum(t, axis=0)
        else:
            return tl.sum(t, axis=1)

    @triton.jit
    def zero_tile(BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_FAST: tl.constexpr):
        if C_FAST:
            return tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        else:
            return tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)

    @triton.jit
    def affine_params(W, B, channels, c_ok, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
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
