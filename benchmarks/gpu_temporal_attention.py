"""GPU benchmark of fused temporal attention against SDPA and eager attention, in one run.

    python benchmarks/gpu_temporal_attention.py            # prints the table
    python benchmarks/gpu_temporal_attention.py --markdown # a table for benchmarks/RESULTS.md
    python benchmarks/gpu_temporal_attention.py --tests    # the unit tests, compiled on this GPU

The one-command GPU suite calls :func:`measure` (rows as dicts) and :func:`run_gpu_tests`.

Per shape (N, F, C, heads), bf16, q/k/v read as views of one packed (N, F, 3C) tensor (what a
fused qkv projection gives), for each implementation:

* ``fwd_ms`` / ``fwd_bwd_ms``: median CUDA-event time of the forward, and of forward + backward;
* ``fwd_floor_pct`` / ``fwd_bwd_floor_pct``: the memory-bandwidth floor (bytes the op must move,
  divided by the device-to-device copy bandwidth measured in the same run) as a share of the time;
  the floor is the fused op's minimal traffic: forward reads q, k, v and writes out (+ fp32 lse);
  backward reads q, k, v, out, dout, lse and writes dq, dk, dv;
* ``saved_bytes``: what the autograd graph keeps for backward (sum of saved tensors);
* ``max_err``: the largest absolute difference from an fp32 reference on the same inputs.

Implementations: ``fastvader`` (this repo's Triton kernel), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention`` on the head-split views, output transposed
back to (N, F, C) as diffusers does) and ``eager`` (matmul, softmax, matmul in bf16, as
diffusers' classic ``AttnProcessor``). A failing implementation (SDPA's memory-efficient kernel
refuses N > 65,535 on some builds) gets its error in ``error`` instead of numbers.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# (N, F, C, heads, what it is). N = batch x latent height x width.
SHAPES = [
    (4608, 16, 320, 5, "UNet3D 384x384 CFG, level 1 (48x48 latents x 2)"),
    (1152, 16, 640, 10, "UNet3D level 2"),
    (288, 16, 1280, 20, "UNet3D level 3"),
    (5120, 16, 320, 5, "UNet3D 320x512 CFG, level 1"),
    (4096, 16, 320, 8, "AnimateDiff motion module, 8 heads of 40"),
    (4608, 12, 320, 5, "F = 12"),
    (4608, 24, 320, 5, "F = 24"),
    (4608, 51, 320, 5, "F = 51"),
]
IMPLS = ("fastvader", "sdpa", "eager")


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, f, c = t.shape
    return t.view(n, f, heads, c // heads).transpose(1, 2)  # (N, heads, F, hd), a view


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    n, h, f, d = t.shape
    return t.transpose(1, 2).reshape(n, f, h * d)


def attention_sdpa(q, k, v, heads):
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return _merge_heads(out)


def attention_eager(q, k, v, heads):
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) * (qh.shape[-1] ** -0.5)
    return _merge_heads(scores.softmax(dim=-1) @ vh)


def _attention_fastvader(q, k, v, heads):
    from fastvader.kernels import temporal_attention

    return temporal_attention(q, k, v, heads)


def _impl(name):
    return {"fastvader": _attention_fastvader, "sdpa": attention_sdpa, "eager": attention_eager}[name]


def _cuda_time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def floor_bytes(n, f, c, heads, itemsize=2) -> tuple[int, int]:
    """(forward, forward + backward) bytes the fused op must move."""
    tile = n * f * c * itemsize
    lse = n * heads * f * 4
    fwd = 4 * tile + lse  # read q, k, v; write out (+ lse)
    bwd = 8 * tile + lse  # read q, k, v, out, dout (+ lse); write dq, dk, dv
    return fwd, fwd + bwd


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure(device: str = "cuda", shapes=None, dtype: torch.dtype = torch.bfloat16,
            impls=IMPLS, reps: int = 20) -> list[dict]:
    """One row per (shape, implementation); see the module docstring for the fields."""
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        raise RuntimeError("measure() needs a CUDA device")
    bandwidth = copy_bandwidth(device)
    gpu = torch.cuda.get_device_name(torch.device(device))
    rows = []
    for n, f, c, heads, what in (shapes or SHAPES):
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(n, f, 3 * c, device=device, dtype=dtype, generator=gen).requires_grad_()
        q, k, v = qkv.split(c, dim=-1)
        grad_out = torch.randn(n, f, c, device=device, dtype=dtype, generator=gen)
        with torch.no_grad():
            want = attention_sdpa(q.float(), k.float(), v.float(), heads)
        fwd_floor, fwd_bwd_floor = floor_bytes(n, f, c, heads, qkv.element_size())
        for name in impls:
            fn = _impl(name)
            row = {"gpu": gpu, "impl": name, "N": n, "F": f, "C": c, "heads": heads,
                   "head_dim": c // heads, "what": what, "copy_GBps": bandwidth / 1e9}
            try:
                with torch.no_grad():
                    err = (fn(q, k, v, heads).float() - want).abs().max().item()

                def fwd():
                    with torch.no_grad():
                        fn(q, k, v, heads)

                def fwd_bwd():
                    qkv.grad = None
                    fn(q, k, v, heads).backward(grad_out)

                fwd_ms = _cuda_time_ms(fwd, reps=reps)
                fwd_bwd_ms = _cuda_time_ms(fwd_bwd, reps=reps)
                saved = _saved_bytes(lambda: fn(q, k, v, heads))
                row.update(
                    fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                    fwd_floor_pct=100 * (fwd_floor / bandwidth * 1e3) / fwd_ms,
                    fwd_bwd_floor_pct=100 * (fwd_bwd_floor / bandwidth * 1e3) / fwd_bwd_ms,
                    saved_bytes=saved, max_err=err, error=None)
            except Exception as exc:  # e.g. SDPA's efficient kernel beyond 65,535 rows
                row.update(fwd_ms=None, fwd_bwd_ms=None, fwd_floor_pct=None, fwd_bwd_floor_pct=None,
                           saved_bytes=None, max_err=None, error=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            torch.cuda.empty_cache()
        del qkv, q, k, v, grad_out, want
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["shape (N, F, C, heads)", "impl", "fwd ms", "fwd+bwd ms", "fwd % floor",
            "fwd+bwd % floor", "saved MiB", "max err"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append("  ".join(f"{h:>14}" for h in head))

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        shape = f"({r['N']}, {r['F']}, {r['C']}, {r['heads']})"
        cells = [shape, r["impl"], fmt(r["fwd_ms"], ".3f"), fmt(r["fwd_bwd_ms"], ".3f"),
                 fmt(r["fwd_floor_pct"], ".1f"), fmt(r["fwd_bwd_floor_pct"], ".1f"),
                 fmt(None if r["saved_bytes"] is None else r["saved_bytes"] / 2**20, ".1f"),
                 fmt(r["max_err"], ".2e") if r["error"] is None else r["error"][:40]]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>14}" for c in cells))
    if rows:
        lines.append(f"\n{rows[0]['gpu']}, copy bandwidth {rows[0]['copy_GBps']:.0f} GB/s, bf16")
    return "\n".join(lines)


def run_gpu_tests(extra_args: list[str] | None = None) -> int:
    """Run tests/kernels/test_temporal_attention.py compiled on this GPU (TRITON_INTERPRET unset);
    returns pytest's exit code."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "kernels" / "test_temporal_attention.py"), "-q",
           *(extra_args or [])]
    return subprocess.call(cmd, cwd=root, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--tests", action="store_true", help="run the unit tests on the GPU instead")
    args = parser.parse_args(argv)
    if args.tests:
        return run_gpu_tests()
    print(format_table(measure(), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
