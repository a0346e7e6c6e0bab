"""The two ops in plain PyTorch: the test oracles and the path the ops take without Triton.

- Oracles: :func:`group_norm_reference` and :func:`temporal_attention_reference`. Autograd does
  their backward; tests call them on float64 copies of the inputs.
- Fallback (the ops' implementation where Triton cannot run: CPU without TRITON_INTERPRET=1, or
  no triton installed): a forward that also returns what the Triton forward keeps for backward
  (GroupNorm: fp32 mean and rstd per (sample, group); attention: the fp32 log-sum-exp of each
  query row, in log2 units like the kernel's), and a backward from exactly those tensors, the
  same formulas as the Triton backward.

Half-precision inputs compute in fp32 and come back in their dtype; float64 computes in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvader.kernels._checks import attention_bias, attention_scale, check_attention, check_group_norm

LOG2E = math.log2(math.e)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)
# ----------------------------------------------------------------------------------------------
def _per_channel(p: torch.Tensor | None, num_groups: int, compute: torch.dtype):
    """A (C,) parameter shaped (1, G, C/G, 1) against x viewed (N, G, C/G, spatial)."""
    return None if p is None else p.to(compute).reshape(1, num_groups, -1, 1)


def _affine(x_hat, weight, bias):
    z = x_hat if weight is None else x_hat * weight
    return z if bias is None else z + bias


def group_norm_forward(x: torch.Tensor, num_groups: int, weight, bias, eps: float, activation):
    """(y, mean, rstd): y in x's dtype and shape, mean and rstd fp32 of shape (N * G,)."""
    compute = _compute_dtype(x.dtype)
    xg = x.to(compute).reshape(x.shape[0], num_groups, x.shape[1] // num_groups, -1)
    mean = xg.mean(dim=(2, 3), keepdim=True)
    rstd = torch.rsqrt((xg - mean).pow(2).mean(dim=(2, 3), keepdim=True) + eps)
    y = _affine((xg - mean) * rstd, _per_channel(weight, num_groups, compute),
                _per_channel(bias, num_groups, compute))
    if activation == "silu":
        y = F.silu(y)
    return y.reshape(x.shape).to(x.dtype), mean.flatten().float(), rstd.flatten().float()


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        num_groups: int, weight, bias, activation):
    """(dx, dweight, dbias) from the forward's input and statistics: dx in x's dtype, the
    parameter gradients as fp32 (C,) sums (computed whether or not the op has parameters)."""
    compute = _compute_dtype(x.dtype)
    grouped = (x.shape[0], num_groups, x.shape[1] // num_groups, -1)
    mean, rstd = (t.to(compute).reshape(-1, num_groups, 1, 1) for t in (mean, rstd))
    w = _per_channel(weight, num_groups, compute)
    x_hat = (x.to(compute).reshape(grouped) - mean) * rstd
    g = dy.to(compute).reshape(grouped)  # d(loss)/d(pre-activation)
    if activation == "silu":
        z = _affine(x_hat, w, _per_channel(bias, num_groups, compute))
        sig = torch.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    dx_hat = g if w is None else g * w
    dx = rstd * (dx_hat - dx_hat.mean(dim=(2, 3), keepdim=True)
                 - x_hat * (dx_hat * x_hat).mean(dim=(2, 3), keepdim=True))
    dweight = (g * x_hat).sum(dim=(0, 3)).flatten().float()
    dbias = g.sum(dim=(0, 3)).flatten().float()
    return dx.reshape(x.shape).to(x.dtype), dweight, dbias


def group_norm_reference(x: torch.Tensor, num_groups: int, weight=None, bias=None,
                         eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) in plain PyTorch: the oracle (call it on float64 inputs; autograd
    gives its backward)."""
    check_group_norm(x, num_groups, weight, bias, activation)
    return group_norm_forward(x, num_groups, weight, bias, eps, activation)[0]


# ----------------------------------------------------------------------------------------------
# Temporal attention
# ----------------------------------------------------------------------------------------------
def _split_heads(t: torch.Tensor, heads: int, compute: torch.dtype) -> torch.Tensor:
    """(N, F, C) -> (N, heads, F, head_dim)."""
    n, f, c = t.shape
    return t.to(compute).reshape(n, f, heads, c // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, heads, F, head_dim) -> contiguous (N, F, C)."""
    n, heads, f, d = t.shape
    return t.transpose(1, 2).reshape(n, f, heads * d).to(dtype).contiguous()


def _scores(q, k, heads: int, scale: float, bias4, compute) -> torch.Tensor:
    """q k^T * scale + bias: (N, heads, F, F) in the compute dtype."""
    scores = _split_heads(q, heads, compute) @ _split_heads(k, heads, compute).transpose(-1, -2) * scale
    return scores if bias4 is None else scores + bias4.to(compute)


def temporal_attention_forward(q, k, v, bias4, heads: int, scale: float):
    """(out, lse): out (N, F, C) contiguous in q's dtype; lse (N, heads, F) fp32, the log2-sum-exp
    of each row's scores (+inf for a row whose every key is masked, whose output is zero).
    ``bias4`` is None or four-dimensional, broadcasting to (N, heads, F, F)."""
    compute = _compute_dtype(q.dtype)
    scores = _scores(q, k, heads, scale, bias4, compute)
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.inf, lse)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ _split_heads(v, heads, compute)
    return _merge_heads(out, q.dtype), (lse * LOG2E).float()


def temporal_attention_backward(dout, q, k, v, bias4, out, lse, heads: int, scale: float):
    """(dq, dk, dv, dscores): the input gradients (contiguous, q's dtype) from the forward's
    inputs, output and log-sum-exp; dscores (N, heads, F, F) fp32 is the bias's gradient before
    it is summed over the bias's broadcast dims."""
    compute = _compute_dtype(q.dtype)
    qh, kh, vh = (_split_heads(t, heads, compute) for t in (q, k, v))
    do, o = _split_heads(dout, heads, compute), _split_heads(out, heads, compute)
    probs = torch.exp(_scores(q, k, heads, scale, bias4, compute) - (lse.to(compute) / LOG2E).unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ do
    dscores = probs * (do @ vh.transpose(-1, -2) - (do * o).sum(dim=-1, keepdim=True))
    dq = dscores @ kh * scale
    dk = dscores.transpose(-1, -2) @ qh * scale
    return (*(_merge_heads(t, q.dtype) for t in (dq, dk, dv)), dscores.float())


def temporal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                 scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention over frames in plain PyTorch (matmul, softmax, matmul): the oracle
    (run it in float64; autograd flows to q, k, v and the bias). Rows whose every key is masked
    with -inf give NaN here (softmax of all -inf) and zeros in the op."""
    check_attention(q, k, v, heads)
    compute = _compute_dtype(q.dtype)
    scores = _scores(q, k, heads, attention_scale(q, heads, scale), attention_bias(bias, q, heads), compute)
    out = torch.softmax(scores, dim=-1) @ _split_heads(v, heads, compute)
    return _merge_heads(out, q.dtype)
