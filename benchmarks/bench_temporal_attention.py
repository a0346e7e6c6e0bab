"""pytest-benchmark cases for temporal attention.

    python -m pytest benchmarks/bench_temporal_attention.py --benchmark-only

On CPU this times the plain-PyTorch reference and SDPA at small shapes (the Triton cases skip
without CUDA; the interpreter is a correctness tool, not something to time). On a GPU it also
times the Triton kernel, forward and forward + backward, at the suite's shapes. The full GPU
comparison with bandwidth-floor shares is ``python -m benchmarks.gpu_temporal_attention``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_temporal_attention import attention_eager, attention_sdpa, grid_shapes  # noqa: E402

from fastvader.kernels import active_backend, temporal_attention, temporal_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# CPU shapes stay small: a busy 2-core machine.
CPU_SHAPES = [(256, 16, 320, 5), (64, 16, 640, 10), (256, 16, 320, 8)]
BENCH_SHAPES = grid_shapes("suite") if CUDA else CPU_SHAPES


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _inputs(n, f, c, requires_grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(n, f, 3 * c, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(requires_grad)
    return qkv, qkv.split(c, dim=-1)


IMPLS = {
    "fastvader": temporal_attention,
    "reference": temporal_attention_reference,
    "sdpa": attention_sdpa,
    "eager": attention_eager,
}


def _skip_unless_runnable(impl):
    if impl == "fastvader" and active_backend(DEVICE) != "triton":
        pytest.skip("the Triton kernel is timed on CUDA only (on CPU it would be the interpreter)")
    if impl == "eager" and not CUDA:
        pytest.skip("eager equals the reference on CPU")


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "N{}-F{}-C{}-h{}".format(*s))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, shape):
    _skip_unless_runnable(impl)
    n, f, c, heads = shape
    _, (q, k, v) = _inputs(n, f, c, requires_grad=False)
    fn = IMPLS[impl]

    def run():
        out = fn(q, k, v, heads)
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == (n, f, c)


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "N{}-F{}-C{}-h{}".format(*s))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, shape):
    _skip_unless_runnable(impl)
    n, f, c, heads = shape
    qkv, (q, k, v) = _inputs(n, f, c, requires_grad=True)
    grad_out = torch.randn(n, f, c, device=DEVICE, dtype=DTYPE)
    fn = IMPLS[impl]

    def run():
        qkv.grad = None
        fn(q, k, v, heads).backward(grad_out)
        _sync()
        return qkv.grad

    grad = benchmark(run)
    assert grad.shape == qkv.shape
