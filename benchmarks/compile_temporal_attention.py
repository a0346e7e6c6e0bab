"""Compile the temporal-attention kernels for a CUDA target without a GPU, and report registers,
spills and shared memory per launch configuration.

    python benchmarks/compile_temporal_attention.py               # v2: every autotune candidate, issue grid
    python benchmarks/compile_temporal_attention.py --bias        # the same with an additive bias and its gradient
    python benchmarks/compile_temporal_attention.py --quick       # the heuristic configuration at two shapes (the test)
    python benchmarks/compile_temporal_attention.py --impl v1     # the v1 kernels at their benchmark shapes
    python benchmarks/compile_temporal_attention.py --frames 16 --head-dims 64 80 --arch 80 --json out.json

v2 compiles, for each (F, head_dim) of the issue's grid (F in {7, 8, 12, 16, 20, 24, 33, 51, 64}
x head_dim in {40, 64, 80, 128, 160}) and the limits (F = 128, head_dim = 256), every launch
configuration the autotuner may measure, forward and backward; without a bias (the video UNets'
temporal attention has none) unless --bias (then with the bias gradient summed per tile, the
heaviest variant). A configuration that does not compile, or spills, shows here on a CPU-only
machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_common import compile_kernel, format_usage, signature  # noqa: E402  (unsets TRITON_INTERPRET)

from fastvader.kernels.ops import temporal_attention as ta  # noqa: E402
from fastvader.kernels.ops import temporal_attention_v1 as ta_v1  # noqa: E402

GRID_FRAMES = (7, 8, 12, 16, 20, 24, 33, 51, 64)
GRID_HEAD_DIMS = (40, 64, 80, 128, 160)
LIMITS = [(128, 256), (128, 40), (7, 256)]
QUICK = [(16, 64), (51, 160)]
V1_SHAPES = [(4608, 16, 320, 5), (4096, 16, 320, 8), (288, 16, 1280, 20), (4608, 24, 320, 5),
             (4608, 51, 320, 5), (4608, 16, 1280, 8)]
_POINTERS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")
_FLOATS = ("qk_scale_log2", "scale")


def _pointer_types(fn, dtype: str) -> dict[str, str]:
    return {name: f"*{dtype}" if name in _POINTERS else "*fp32" for name in fn.arg_names
            if name in _POINTERS or name in ("Bias", "Lse", "DBias")}


def compile_v2(frames: int, head_dim: int, dtype: str = "bf16", arch: int = 90, with_bias: bool = False,
               heuristic_only: bool = False) -> list[dict]:
    """One record per (candidate configuration, forward/backward); only the first (heuristic)
    candidate of each with ``heuristic_only``."""
    records = []
    shared = dict(F=frames, HEAD_DIM=head_dim, HAS_BIAS=with_bias, INTERPRETED=False,
                  INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    for direction, fn, extra in (("fwd", ta._attn_fwd_kernel, dict(STORE_LSE=True)),
                                 ("bwd", ta._attn_bwd_kernel, dict(F_PAD=max(16, ta._next_pow2(frames)),
                                                                   BIAS_GRAD=2 if with_bias else 0))):
        candidates = ta._candidates(frames, head_dim, 4608, interpreted=False, backward=direction == "bwd")
        for cfg in candidates[:1] if heuristic_only else candidates:
            constexprs = {**dict(cfg.blocks, CLIPS=cfg["BLOCK_R"] // frames, **shared), **extra}
            sig = signature(fn, constexprs, _pointer_types(fn, dtype), _FLOATS)
            result = compile_kernel(fn, sig, constexprs, cfg.num_warps, cfg.num_stages, arch)
            records.append({"impl": "v2", "kernel": direction, "F": frames, "head_dim": head_dim, "dtype": dtype,
                            "bias": with_bias, "arch": f"sm_{arch}", "config": cfg.describe(), **result})
    return records


def compile_v1(n: int, frames: int, channels: int, heads: int, dtype: str = "bf16", arch: int = 90) -> list[dict]:
    """The v1 kernels as their launcher would configure them for (N, F, C, heads)."""
    f_pad, d_pad = ta_v1._padded_dims(frames, channels // heads)
    records = []
    for backward, fn in ((False, ta_v1._temporal_attn_fwd_kernel), (True, ta_v1._temporal_attn_bwd_kernel)):
        rows, warps = ta_v1._pick_block_rows(n, f_pad, d_pad, backward=backward, interpret=False)
        constexprs = dict(HAS_BIAS=True, INTERPRETED=False, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                          BLOCK_N=rows, F_PAD=f_pad, D_PAD=d_pad, Q_BLOCK=ta_v1._q_block(f_pad))
        if backward:
            constexprs.update(BIAS_GRAD=True, BIAS_GRAD_PER_ROW=False)
        sig = signature(fn, constexprs, _pointer_types(fn, dtype), _FLOATS)
        result = compile_kernel(fn, sig, constexprs, warps, 1, arch)
        records.append({"impl": "v1", "kernel": "bwd" if backward else "fwd", "F": frames,
                        "head_dim": channels // heads, "dtype": dtype, "arch": f"sm_{arch}",
                        "config": f"BLOCK_N={rows} warps={warps}", **result})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["v2", "v1"], default="v2")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--frames", type=int, nargs="*", help="only these F")
    parser.add_argument("--head-dims", type=int, nargs="*", help="only these head_dim (v2)")
    parser.add_argument("--bias", action="store_true", help="v2 with an additive bias and its gradient")
    parser.add_argument("--quick", action="store_true", help=f"v2's heuristic configuration at {QUICK} only")
    parser.add_argument("--json", help="also write the records to this file")
    args = parser.parse_args(argv)
    records = []
    if args.impl == "v1":
        for n, f, c, heads in V1_SHAPES:
            if not args.frames or f in args.frames:
                records += compile_v1(n, f, c, heads, args.dtype, args.arch)
    else:
        shapes = QUICK if args.quick else [(f, d) for f in GRID_FRAMES for d in GRID_HEAD_DIMS] + LIMITS
        for f, d in shapes:
            if (not args.frames or f in args.frames) and (not args.head_dims or d in args.head_dims):
                for record in compile_v2(f, d, args.dtype, args.arch, args.bias, heuristic_only=args.quick):
                    records.append(record)
                    print(f"{record['arch']} {record['dtype']} {record['impl']} {record['kernel']} F={f:>3} "
                          f"head_dim={d:>3}{' bias' if args.bias else ''} {record['config']}: {format_usage(record)}",
                          flush=True)
    if args.impl == "v1":
        for r in records:
            print(f"{r['arch']} {r['dtype']} v1 {r['kernel']} F={r['F']} head_dim={r['head_dim']} {r['config']}: "
                  f"{format_usage(r)}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
