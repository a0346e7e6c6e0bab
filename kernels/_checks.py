"""Argument checks shared by the ops and their plain-PyTorch references (a caller's mistake
gets one line naming the argument, its value and what it must be), and the attention bias's
shape helpers shared by the launchers."""
from __future__ import annotations

import torch

ACTIVATIONS = (None, "silu")
GROUP_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_group_norm(x: torch.Tensor, num_groups: int, weight, bias, activation) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm expects (N, C, *spatial), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the {channels} channels of x")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != channels):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(p.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in GROUP_NORM_DTYPES:
        raise TypeError(f"group_norm supports float32/float16/bfloat16/float64 input, got {x.dtype}")


def check_attention(q, k, v, heads) -> None:
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


def attention_bias(bias: torch.Tensor | None, q: torch.Tensor, heads: int) -> torch.Tensor | None:
    """``bias`` as an additive float tensor of four dims (a view where it can be) that broadcasts
    to (N, heads, F, F); a bool mask (True = attend) becomes 0 / -inf."""
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
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def attention_scale(q: torch.Tensor, heads: int, scale: float | None) -> float:
    return float(scale) if scale is not None else (q.shape[-1] // heads) ** -0.5


def bias_view(bias4: torch.Tensor | None, n: int, heads: int, f: int):
    """(bias expanded to (N, heads, F, F), its four strides): zero strides for broadcast dims."""
    if bias4 is None:
        return None, (0, 0, 0, 0)
    expanded = bias4.expand(n, heads, f, f)
    return expanded, tuple(expanded.stride())


def bias_grad_shape(bias4: torch.Tensor, n: int, heads: int, f: int) -> tuple[int, int, int, int]:
    """The fp32 bias gradient the backward op returns: summed over the rows and heads the bias
    broadcasts over by shape (a bias that is itself an expanded view still gets a per-element
    gradient, as autograd expects)."""
    return (n if bias4.shape[0] != 1 else 1, heads if bias4.shape[1] != 1 else 1, f, f)
