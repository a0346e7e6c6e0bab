"""pytest-benchmark cases for GroupNorm+SiLU: `pytest benchmarks/bench_group_norm.py --benchmark-only`.

CPU cases compare the PyTorch reference path (what `group_norm` runs on CPU) with eager
GroupNorm+SiLU at small shapes. Triton cases need CUDA and run the issue's shapes; the full GPU
table (bandwidth-floor shares, saved bytes, decode memory) is `python -m benchmarks.gpu_group_norm`.
"""
import pytest
import torch
import torch.nn.functional as F

from fastvader.kernels import group_norm_reference
from fastvader.kernels.ops.group_norm import group_norm_triton

CPU_SHAPES = [(2, 64, 32, 32), (1, 128, 4, 16, 16)]
GPU_SHAPES = [(16, 512, 48, 48), (16, 512, 96, 96), (16, 256, 192, 192), (16, 128, 384, 384)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton cases need CUDA")


def _args(shape, device, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1], device=device, requires_grad=True)
    b = torch.randn(shape[1], device=device, requires_grad=True)
    return x, w, b


def _fwd_bwd(fn, x, w, b, sync):
    def step():
        y = fn()
        torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        sync()
    return step


def _eager(x, w, b, groups=32):
    return F.silu(F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype), 1e-5))


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["reference", "eager"])
def test_cpu_group_norm_silu_fwd_bwd(benchmark, shape, impl):
    x, w, b = _args(shape, "cpu", torch.float32)
    fn = (lambda: group_norm_reference(x, 32, w, b, 1e-5, "silu")) if impl == "reference" else (lambda: _eager(x, w, b))
    benchmark(_fwd_bwd(fn, x, w, b, lambda: None))


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_cuda_group_norm_silu(benchmark, shape, impl, mode):
    x, w, b = _args(shape, "cuda", torch.bfloat16)
    fn = (lambda: group_norm_triton(x, 32, w, b, 1e-5, "silu")) if impl == "triton" else (lambda: _eager(x, w, b))
    sync = torch.cuda.synchronize
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn()
            sync()
        benchmark(step)
    else:
        benchmark(_fwd_bwd(fn, x, w, b, sync))
