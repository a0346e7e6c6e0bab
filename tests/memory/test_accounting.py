"""saved_bytes: exact on hand-countable graphs, storages counted once, parameters excluded,
the same figure on the meta device as on the CPU, and GPU-like attention that keeps O(N)."""
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ answers transformers'
# probe for Hugging Face's `kernels` package and breaks its imports; fastvader is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[2]]

import pytest  # noqa: E402
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.memory.accounting import flash_like_sdpa, gpu_like_attention, record_saved, saved_bytes

torch.set_num_threads(1)  # these machines are shared: one thread avoids oversubscription


def test_counts_exactly_what_backward_keeps():
    x = torch.randn(64, 32, requires_grad=True)
    # sigmoid keeps its output (64*32 fp32); exp keeps its output too
    assert saved_bytes(lambda: torch.sigmoid(x).exp()) == 2 * 64 * 32 * 4


def test_one_storage_counted_once():
    x = torch.randn(128, requires_grad=True)
    # x * x saves x twice: same storage, counted once; x[::2] is a view of x: still once
    assert saved_bytes(lambda: x * x) == 128 * 4
    assert saved_bytes(lambda: (x * x) + (x[::2] * x[1::2]).sum()) == 128 * 4


def test_parameters_are_not_activations():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    # linear saves its input (4x16) and the weight; the weight is not counted
    assert saved_bytes(lin, x) == 4 * 16 * 4
    assert saved_bytes(lambda: lin(x)) == 4 * 16 * 4


def test_no_grad_keeps_nothing():
    x = torch.randn(64, 64, requires_grad=True)
    with torch.no_grad():
        assert saved_bytes(lambda: x.exp().exp()) == 0


def _toy_unet():
    from fastvader.toy.model import ToyWorldConfig, build_toy_world

    return build_toy_world(ToyWorldConfig()).unet


def test_meta_device_matches_cpu():
    unet = _toy_unet().requires_grad_(True)
    x, ctx = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 8, 64)
    t = torch.tensor([10, 10])
    on_cpu = saved_bytes(lambda: unet(x, t, encoder_hidden_states=ctx).sample)
    meta = unet.to("meta")
    on_meta = saved_bytes(lambda: meta(x.to("meta"), t.to("meta"), encoder_hidden_states=ctx.to("meta")).sample)
    assert on_cpu > 0
    # Meta kernels pick output strides on their own; a few reshapes then copy where the CPU
    # kernel returned a view (measured: +4% on this UNet). Meta errs on the safe side.
    assert on_cpu <= on_meta <= 1.10 * on_cpu


def test_gpu_like_attention_is_exact_and_keeps_linear_memory():
    q, k, v = (torch.randn(2, 3, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    gref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = flash_like_sdpa(q, k, v)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, gref):
        torch.testing.assert_close(a, b)
    with record_saved(gpu_attention=False) as math_log:
        F.scaled_dot_product_attention(q, k, v)
    with record_saved() as flash_log:
        F.scaled_dot_product_attention(q, k, v)
    # the GPU-like path keeps q, k, v, out (4 x 2*3*64*16 doubles) + a float32 row statistic
    assert flash_log.total == 4 * 2 * 3 * 64 * 16 * 8 + 2 * 3 * 64 * 4
    assert math_log.total > flash_log.total  # the math path keeps the 64x64 probabilities too
    assert F.scaled_dot_product_attention is not flash_like_sdpa  # restored after the block


def test_gpu_like_attention_restores_on_error():
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError):
        with gpu_like_attention():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original
