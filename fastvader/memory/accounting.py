"""How many bytes does the autograd graph keep?

``saved_bytes(fn, *args, **kwargs)`` runs ``fn`` under saved-tensor hooks and sums the storage
of every tensor the graph saves for backward (each storage once, however many views of it are
saved). Parameters are not counted: they are resident anyway and the planner counts them as
weights. It works on the meta device, so real-size models are measured on a CPU machine without
allocating a byte.

One trap on meta/CPU: ``scaled_dot_product_attention`` dispatches to the math path there, which
keeps the (tokens x tokens) probability matrix for backward; on a GPU the flash/efficient
kernels keep only q, k, v, the output and a log-sum-exp row. ``gpu_like_attention()`` swaps in an
attention that keeps exactly what the GPU kernels keep (and recomputes the rest in backward), so
meta measurements describe the GPU. ``saved_bytes`` uses it unless told otherwise. On meta
it also skips building the probability matrix in no-grad calls (only shapes exist there), so
working-set measurements do not see a matrix the GPU kernels never build.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (works for meta tensors, whose data_ptr is always 0)."""
    return t.untyped_storage()._cdata


def storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class SavedTensorLog:
    """The distinct storages saved while a log is active: key -> (bytes, example)."""

    exclude: set[int] = field(default_factory=set)
    storages: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)

    def add(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter):
            return  # weights (and views of them) are resident anyway: counted as weights
        key = storage_key(t)
        if key in self.exclude or key in self.storages:
            return
        self.storages[key] = (storage_nbytes(t), t)

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def largest(self, n: int = 5) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
        rows = sorted(self.storages.values(), key=lambda r: -r[0])[:n]
        return [(tuple(t.shape), t.dtype, nbytes) for nbytes, t in rows]


def _parameter_storages(objs: Iterable[Any]) -> set[int]:
    keys: set[int] = set()
    for obj in objs:
        module = obj if isinstance(obj, nn.Module) else getattr(obj, "__self__", None)
        if isinstance(module, nn.Module):
            keys.update(storage_key(p) for p in module.parameters())
            keys.update(storage_key(b) for b in module.buffers())
    return keys


@contextlib.contextmanager
def record_saved(exclude_modules: Iterable[nn.Module] = (), gpu_attention: bool = True) -> Iterator[SavedTensorLog]:
    """Log every tensor saved for backward inside the block (the tensors stay saved: this only
    watches). Weights and buffers of ``exclude_modules`` are not counted."""
    log = SavedTensorLog(exclude=_parameter_storages(exclude_modules))

    def pack(t):
        log.add(t)
        return t

    attention = gpu_like_attention() if gpu_attention else contextlib.nullcontext()
    with attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield log


def saved_bytes(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Bytes of activations the autograd graph keeps after ``fn(*args, **kwargs)`` (distinct
    storages, parameters excluded). ``fn``'s result is dropped."""
    with record_saved([fn, *args, *kwargs.values()]) as log:
        fn(*args, **kwargs)
    return log.total


# ---------------------------------------------------------------------------------------------
# attention that keeps what GPU kernels keep
# ---------------------------------------------------------------------------------------------
_original_sdpa = F.scaled_dot_product_attention


def _attention(q, k, v, attn_mask, is_causal, scale):
    """The attention output without the (tokens x tokens) matrix on the meta device, where
    only the shape matters; the real thing elsewhere."""
    if q.device.type == "meta":
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    return _original_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale)


class _FlashLikeAttention(torch.autograd.Function):
    """Saves q, k, v, out and a float32 log-sum-exp per query row, like FlashAttention; backward
    recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale):
        with torch.no_grad():
            out = _attention(q, k, v, attn_mask, is_causal, scale)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # what the kernel keeps; unused here
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attn_mask, ctx.is_causal, ctx.scale = attn_mask, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = _original_sdpa(q_, k_, v_, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal, scale=ctx.scale)
            inputs = [t for t in (q_, k_, v_) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, inputs, grad_out)) if inputs else iter(())
        return tuple(next(grads) if t.requires_grad else None for t in (q_, k_, v_)) + (None,) * 4


def flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, **kw):
    # diffusers' attention dispatcher passes enable_gqa=False explicitly
    if kw or dropout_p or enable_gqa:
        return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _attention(query, key, value, attn_mask, is_causal, scale)
    return _FlashLikeAttention.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)


@contextlib.contextmanager
def gpu_like_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` through ``flash_like_sdpa`` inside the block."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
