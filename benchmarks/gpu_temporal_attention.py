"""GPU benchmark of temporal attention: fastvader's kernels (v2 autotuned, and v1) against SDPA's
best backend, FlexAttention and eager attention, on the same inputs, in one command.

    python -m benchmarks.gpu_temporal_attention                # the suite's grid: table + JSON in benchmarks/results/
    python -m benchmarks.gpu_temporal_attention --grid full    # F {7,...,64} x head_dim {40,...,160}, and N up to 1e5
    python -m benchmarks.gpu_temporal_attention --dry-run      # CPU, tiny shapes: checks the wiring, no figure
    python -m benchmarks.gpu_temporal_attention --tests        # tests/kernels/test_temporal_attention.py on this GPU

Per shape (N, F, C = heads x head_dim), bf16, q, k, v and the output gradient as separate
(N, F, C) tensors, and per implementation:

* ``fwd_ms``: median GPU time per call of the forward with gradients off (fastvader's inference
  op: no log-sum-exp) and ``fwd_bwd_ms``: the training forward plus the backward
  (``torch.autograd.grad`` to q, k, v); CUDA-graph replays of many calls (kernel_bench.time_ms);
* ``fwd_floor_pct`` / ``fwd_bwd_floor_pct``: the memory-bandwidth floor of the op's own traffic
  over the measured time, with copy bandwidth measured in the same run. Forward: read q, k, v,
  write out (4 tiles); forward + backward: 4 tiles + the fp32 log-sum-exp, then read q, k, v,
  out, dout, lse and write dq, dk, dv (8 tiles + lse). Every implementation gets the same floor;
* ``saved_bytes`` (what autograd keeps for backward) and ``max_err`` (largest absolute
  difference of the bf16 output from an fp32 reference on the same inputs).

Implementations: ``fastvader`` (v2, the configurations its autotuner chose are printed and kept
in the JSON), ``fastvader-v1`` (FASTVADER_KERNEL_IMPL=v1), ``sdpa`` (each available backend of
``scaled_dot_product_attention`` on the head-split views, as diffusers calls it; the row keeps
the fastest, forward and forward+backward separately, and names them), ``flex`` (FlexAttention,
compiled, one block-diagonal mask over the flattened (N*F) sequence: the same formulation as
fastvader v2; where torch has it; in the suite's grid at F = 16 only, as it compiles per shape)
and ``eager`` (matmul, softmax, matmul). A failing
implementation gets its error in ``error`` instead of numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import copy_bandwidth, floor_pct, kernel_generation, markdown_table, time_ms  # noqa: E402
from result_files import record, write  # noqa: E402

GRID_FRAMES = (7, 8, 12, 16, 20, 24, 33, 51, 64)
GRID_HEAD_DIMS = (40, 64, 80, 128, 160)
# heads per head_dim as in the video UNets (AnimateDiff 8 x 40 / 80 / 160, ModelScope 5 x 64)
HEADS = {40: 8, 64: 5, 80: 8, 128: 5, 160: 8}
ROWS = 4608  # N of ModelScope's first level at 384x384 with CFG (2 x 48 x 48)
N_SWEEP = (288, 4608, 36_864, 100_000)  # at F = 16, head_dim = 64
SUITE_FRAMES, SUITE_HEAD_DIMS = (8, 16, 24, 51), (40, 64, 160)
DRY_SHAPES = [(6, 5, 16, 2)]
IMPLS = ("fastvader", "fastvader-v1", "sdpa", "flex", "eager")


def grid_shapes(grid: str) -> list[tuple[int, int, int, int]]:
    """(N, F, C, heads) of a grid: 'suite' (a cross-section for the one-command suite), 'full'
    (the issue's grid) or 'dry' (tiny CPU shapes)."""
    if grid == "dry":
        return list(DRY_SHAPES)
    frames, dims = (GRID_FRAMES, GRID_HEAD_DIMS) if grid == "full" else (SUITE_FRAMES, SUITE_HEAD_DIMS)
    shapes = [(ROWS, f, HEADS[d] * d, HEADS[d]) for f in frames for d in dims]
    sweep = N_SWEEP if grid == "full" else N_SWEEP[::3]
    return shapes + [(n, 16, 320, 5) for n in sweep if (n, 16, 320, 5) not in shapes]


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


def _flex_attention(n: int, f: int, c: int, heads: int, device: torch.device):
    """FlexAttention over the flattened (1, heads, N*F, head_dim) sequence with a block-diagonal
    mask (query and key in the same clip): the block mask lets it skip other clips' blocks."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device.type != "cuda":
        raise RuntimeError("FlexAttention is benchmarked on CUDA only")
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx // f == kv_idx // f, None, None, n * f, n * f,
                             device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, heads_):
        flat = [t.view(1, n * f, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
        return compiled(*flat, block_mask=mask).transpose(1, 2).reshape(n, f, c)
    return run


def _sdpa_backends() -> list:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [getattr(SDPBackend, name) for name in names if hasattr(SDPBackend, name)]


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _time_impl(fn, q, k, v, dout, heads, device, reps) -> dict:
    """fwd (no grad) and fwd+bwd times, saved bytes and the output (for the error); ``reps``
    calls per timing (a dry run times one call once)."""
    def forward():
        with torch.no_grad():
            return fn(q, k, v, heads)

    def forward_backward():
        return torch.autograd.grad(fn(q, k, v, heads), (q, k, v), dout)

    out = forward()
    replays = 5 if device.type == "cuda" else 1
    fwd_ms, method = time_ms(forward, device, reps, replays)
    fwd_bwd_ms, _ = time_ms(forward_backward, device, reps, replays)
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, saved_bytes=_saved_bytes(lambda: fn(q, k, v, heads)),
                timing=method, out=out)


def _sdpa_best(q, k, v, dout, heads, device, reps) -> dict:
    """The fastest SDPA backend, forward and forward+backward chosen separately."""
    if device.type != "cuda":
        return _time_impl(attention_sdpa, q, k, v, dout, heads, device, reps) | {"backend": "cpu"}
    from torch.nn.attention import sdpa_kernel

    results, errors = {}, []
    for backend in _sdpa_backends():
        try:
            with sdpa_kernel([backend]):
                results[backend.name] = _time_impl(attention_sdpa, q, k, v, dout, heads, device, reps)
        except Exception as err:  # noqa: BLE001  (a backend that refuses the shape)
            errors.append(f"{backend.name}: {type(err).__name__}")
    if not results:
        raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))
    fwd = min(results, key=lambda b: results[b]["fwd_ms"])
    fwd_bwd = min(results, key=lambda b: results[b]["fwd_bwd_ms"])
    return {**results[fwd_bwd], "fwd_ms": results[fwd]["fwd_ms"], "out": results[fwd]["out"],
            "backend": f"fwd {fwd}, fwd+bwd {fwd_bwd}"}


def _configs_chosen(f: int, head_dim: int, dtype: torch.dtype) -> str | None:
    from fastvader.kernels.ops import temporal_attention as ta

    fwd = ta.FORWARD_TUNER.chosen((f, head_dim, dtype, False))
    bwd = ta.BACKWARD_TUNER.chosen((f, head_dim, dtype, False, 0))
    if fwd is None and bwd is None:
        return None
    return f"fwd {fwd.describe() if fwd else 'heuristic'}; bwd {bwd.describe() if bwd else 'heuristic'}"


def _measure_shape(shape, impls, device, dtype, bandwidth, reps) -> list[dict]:
    n, f, c, heads = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(n, f, c, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(n, f, c, device=device, dtype=dtype, generator=gen)
    with torch.no_grad():
        want = attention_sdpa(q.float(), k.float(), v.float(), heads)
    tile = n * f * c * q.element_size()
    lse = n * heads * f * 4
    fwd_bytes, fwd_bwd_bytes = 4 * tile, 12 * tile + 2 * lse
    rows = []
    for impl in impls:
        row = {"impl": impl, "N": n, "F": f, "C": c, "heads": heads, "head_dim": c // heads,
               "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bwd_bytes, "error": None}
        try:
            if impl == "sdpa":
                result = _sdpa_best(q, k, v, dout, heads, device, reps)
            elif impl in ("fastvader", "fastvader-v1"):
                with kernel_generation("v1" if impl == "fastvader-v1" else "v2"):
                    result = _time_impl(_attention_fastvader, q, k, v, dout, heads, device, reps)
                if impl == "fastvader":
                    result["config"] = _configs_chosen(f, c // heads, dtype)
            else:
                fn = attention_eager if impl == "eager" else _flex_attention(n, f, c, heads, device)
                result = _time_impl(fn, q, k, v, dout, heads, device, reps)
            out = result.pop("out")
            row.update(result, max_err=(out.float() - want).abs().max().item(),
                       fwd_floor_pct=floor_pct(fwd_bytes, bandwidth, result["fwd_ms"]),
                       fwd_bwd_floor_pct=floor_pct(fwd_bwd_bytes, bandwidth, result["fwd_bwd_ms"]))
        except Exception as err:  # noqa: BLE001  (recorded; the other implementations still run)
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        rows.append(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(device: str = "cuda", grid: str = "suite", impls=IMPLS, reps: int = 50, dry: bool = False,
            log=print) -> tuple[list[dict], dict]:
    """(rows, meta): one row per (shape, implementation); meta holds the copy bandwidth and the
    autotuner's choices with every candidate's time."""
    from fastvader.kernels.ops import temporal_attention as ta

    dev = torch.device(device)
    if dev.type != "cuda" and not dry:
        raise RuntimeError("measure() needs a CUDA device (dry=True checks the wiring on a CPU)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(dev)
    rows = []
    for shape in grid_shapes("dry" if dry else grid):
        # FlexAttention compiles per shape (tens of seconds): the suite's grid takes it at F = 16
        shape_impls = [i for i in impls if i != "flex" or grid == "full" or dry or shape[1] == 16]
        rows += _measure_shape(shape, shape_impls, dev, dtype, bandwidth, reps if not dry else 1)
        log(format_table(rows[-len(shape_impls):], header=len(rows) == len(shape_impls)))
    meta = {"grid": "dry" if dry else grid, "dtype": str(dtype).replace("torch.", ""),
            "copy_GBps": bandwidth / 1e9,
            "autotuned": ta.FORWARD_TUNER.report() + ta.BACKWARD_TUNER.report()}
    for entry in meta["autotuned"]:
        log(f"autotuned {entry['kernel']} {entry['key']}: {entry['chosen']}  (candidates ms: {entry['candidates_ms']})")
    return rows, meta


COLUMNS = [("N", "N", ""), ("F", "F", ""), ("C", "C", ""), ("heads", "heads", ""), ("impl", "impl", ""),
           ("fwd ms", "fwd_ms", ".3f"), ("fwd+bwd ms", "fwd_bwd_ms", ".3f"), ("fwd % floor", "fwd_floor_pct", ".1f"),
           ("fwd+bwd % floor", "fwd_bwd_floor_pct", ".1f"), ("saved MiB", "saved_MiB", ".1f"),
           ("max err", "max_err", ".2e"), ("backend / config", "detail", ""), ("error", "error", "")]


def format_table(rows: list[dict], header: bool = True) -> str:
    shown = [{**r, "saved_MiB": None if r.get("saved_bytes") is None else r["saved_bytes"] / 2 ** 20,
              "detail": r.get("backend") or r.get("config")} for r in rows]
    table = markdown_table(shown, COLUMNS)
    return table if header else "\n".join(table.splitlines()[2:])


def run_gpu_tests(extra_args: list[str] | None = None) -> int:
    """tests/kernels/test_temporal_attention.py compiled on this GPU (TRITON_INTERPRET unset);
    pytest's exit code."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "kernels" / "test_temporal_attention.py"), "-q",
           *(extra_args or [])]
    return subprocess.call(cmd, cwd=root, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=["suite", "full"], default="suite")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=50, help="calls per timed CUDA graph")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the wiring only")
    parser.add_argument("--results-dir", default=None,
                        help="where the JSON goes (default benchmarks/results/; a dry run: a temporary folder)")
    parser.add_argument("--tests", action="store_true", help="run the unit tests on the GPU instead")
    args = parser.parse_args(argv)
    if args.tests:
        return run_gpu_tests()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run to check the wiring on a CPU)")
    rows, meta = measure(device, args.grid, args.impls, args.reps, dry=args.dry_run)
    print(f"wrote {write(record('temporal_attention', rows, dry_run=args.dry_run, extra=meta), args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
