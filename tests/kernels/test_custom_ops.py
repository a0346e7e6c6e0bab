"""The ops as torch custom ops: ``torch.library.opcheck`` (schema, autograd registration, fake
implementation against the real one, and AOT-autograd tracing with dynamic shapes) on odd
shapes, for the Triton path (the interpreter on CPU) and the plain-PyTorch path: the training ops
(forward, backward) and the inference ops (no statistics, no log-sum-exp)."""
from __future__ import annotations

import pytest
import torch

from fastvader.kernels import active_backend
from fastvader.kernels.ops.group_norm import _group_norm_bwd, _group_norm_bwd_input, _group_norm_fwd, _group_norm_infer
from fastvader.kernels.ops.temporal_attention import _attention_bwd, _attention_fwd, _attention_infer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "pytorch"])
def path(request, monkeypatch):
    """'triton': the kernels (interpreted on CPU); 'pytorch': the ops' no-Triton implementation."""
    if request.param == "pytorch":
        if DEVICE == "cuda":
            pytest.skip("CUDA tensors always take the Triton path")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    if request.param == "triton" and active_backend(DEVICE) == "reference":
        pytest.skip("needs triton (CUDA, or the interpreter via TRITON_INTERPRET=1)")
    return request.param


def _randn(*shape, grad=True, generator):
    return torch.randn(shape, generator=generator).to(DEVICE).requires_grad_(grad)


# (N, C, spatial, groups, affine, activation): odd channel counts and spatial sizes, a
# channels-last input, inputs without gradient, and an op without parameters
GROUP_NORM_CASES = [
    (2, 6, (5, 3), 3, True, "silu"),
    (1, 10, (7,), 5, False, None),
    (3, 4, (3, 2, 5), 2, True, None),
    (1, 12, (3, 5), 4, "channels_last", "silu"),
]


@pytest.mark.parametrize("case", GROUP_NORM_CASES, ids=lambda c: f"N{c[0]}-C{c[1]}-G{c[3]}-{c[4]}-{c[5]}")
def test_group_norm_opcheck(case, path):
    n, c, spatial, groups, affine, activation = case
    g = torch.Generator().manual_seed(0)
    x = _randn(n, c, *spatial, generator=g)
    if affine == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    weight = _randn(c, generator=g) if affine else None
    bias = _randn(c, grad=False, generator=g) if affine else None
    torch.library.opcheck(_group_norm_fwd, (x, weight, bias, groups, 1e-5, activation, None, None))
    # the backward ops on their own (with parameter gradients, and dx alone), fed what the forward saves
    _, mean, rstd = _group_norm_fwd(x, weight, bias, groups, 1e-5, activation, None, None)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    x, weight, bias = (None if t is None else t.detach() for t in (x, weight, bias))
    for backward in (_group_norm_bwd, _group_norm_bwd_input):
        torch.library.opcheck(backward, (dy, x, mean, rstd, weight, bias, groups, activation, None, None))
    torch.library.opcheck(_group_norm_infer, (x, weight, bias, groups, 1e-5, activation, None, None))


# (N, F, C, heads, bias shape or None, bias requires grad)
ATTENTION_CASES = [
    (3, 5, 12, 3, None, False),
    (2, 7, 8, 1, (7, 7), True),
    (5, 3, 20, 5, (5, 1, 3, 3), True),
    (4, 6, 12, 2, (1, 2, 1, 6), False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"N{c[0]}-F{c[1]}-C{c[2]}-h{c[3]}-bias{c[4]}")
def test_temporal_attention_opcheck(case, path):
    n, f, c, heads, bias_shape, bias_grad = case
    g = torch.Generator().manual_seed(1)
    qkv = _randn(n, f, 3 * c, grad=False, generator=g)
    q, k, v = (t.requires_grad_() for t in qkv.split(c, dim=-1))  # strided views, like a packed qkv
    bias = None
    if bias_shape is not None:
        bias = _randn(*bias_shape, grad=bias_grad, generator=g).reshape((1,) * (4 - len(bias_shape)) + bias_shape)
    torch.library.opcheck(_attention_fwd, (q, k, v, bias, heads, 0.4))
    # the backward op on its own, fed what the forward saves
    out, lse = _attention_fwd(q, k, v, bias, heads, 0.4)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    q, k, v, bias, out = (None if t is None else t.detach() for t in (q, k, v, bias, out))
    torch.library.opcheck(_attention_bwd, (dout, q, k, v, bias, out, lse, heads, 0.4, bias_grad))
    torch.library.opcheck(_attention_infer, (q, k, v, bias, heads, 0.4))
