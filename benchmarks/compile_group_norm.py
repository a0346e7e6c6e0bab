"""Compile the GroupNorm+SiLU kernels (v2) for a CUDA target without a GPU, and report registers,
spills and shared memory for the plans the launcher makes at the benchmark's shapes.

    python benchmarks/compile_group_norm.py              # sm_90, bf16, every kernel of every plan
    python benchmarks/compile_group_norm.py --quick      # one resident and one split plan (what the test runs)
    python benchmarks/compile_group_norm.py --arch 80 --json out.json

Per shape the plan (resident or split, block sizes, warps) is the one ``_cached_plan`` makes
for a 132-SM card; every kernel that plan launches is compiled (forward with statistics,
backward without and with parameter gradients).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_common import compile_kernel, format_usage, signature  # noqa: E402  (unsets TRITON_INTERPRET)

import torch  # noqa: E402

from fastvader.kernels.ops import group_norm as gn  # noqa: E402

SMS = 132  # an H100/H200
# (shape, memory format): UNet levels of ModelScope at 384x384 (CFG batch x 16 frames), its
# temporal-conv norms (5-D frame-major views: contiguous here), AnimateDiff's first level at
# 512x512, VAE decoder groups one frame at a time and 16 at once, and channels-last.
SHAPES = [
    ((32, 320, 48, 48), "contiguous"), ((32, 640, 24, 24), "contiguous"), ((32, 1280, 12, 12), "contiguous"),
    ((32, 1280, 6, 6), "contiguous"), ((2, 320, 16, 48, 48), "contiguous"), ((32, 320, 64, 64), "contiguous"),
    ((1, 512, 48, 48), "contiguous"), ((16, 512, 48, 48), "contiguous"), ((16, 128, 384, 384), "contiguous"),
    ((32, 320, 48, 48), "channels_last"),
]
QUICK = [((32, 320, 48, 48), "contiguous"), ((16, 512, 48, 48), "channels_last")]
_FLOATS = ("eps",)


def _pointers(fn, dtype: str) -> dict[str, str]:
    data = {"X": f"*{dtype}", "Y": f"*{dtype}", "DY": f"*{dtype}", "DX": f"*{dtype}", "W": "*fp32", "B": "*fp32"}
    return {name: data.get(name, "*fp32") for name in fn.arg_names if name[0].isupper() and name not in _CONSTEXPR_NAMES}


_CONSTEXPR_NAMES = {"CPG", "S", "S_INNER", "BLOCK", "SPLIT_S", "CONTIGUOUS", "DY_CONTIGUOUS", "HAS_W", "HAS_B", "SILU",
                    "STORE_STATS", "BLOCK_C", "BLOCK_S", "C_FAST", "BLOCK_K", "BLOCK_CPG", "G", "C", "SPLIT",
                    "S_PER_SPLIT"}


def _launches(plan, param_grads: bool) -> list[tuple[str, object, dict, int]]:
    """(name, kernel, constexprs, warps) of every kernel the plan launches, forward and backward."""
    lay = plan.layout
    flags = dict(HAS_W=True, HAS_B=True, SILU=True)
    if plan.resident_block:
        resident = dict(CPG=plan.cpg, S=lay.S, S_INNER=lay.S_inner, BLOCK=plan.resident_block, SPLIT_S=lay.split_s,
                        CONTIGUOUS=gn._group_contiguous(plan, lay.strides()), **flags)
        launches = [("resident fwd", gn._gn_resident_fwd_kernel, dict(resident, STORE_STATS=True), plan.resident_warps)]
        if not param_grads:
            return launches + [("resident bwd", gn._gn_resident_bwd_kernel,
                                dict(resident, DY_CONTIGUOUS=resident["CONTIGUOUS"]), plan.resident_warps)]
    else:
        launches = []
    tiles = dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, C_FAST=lay.c_fast, SPLIT_S=lay.split_s)
    finalize = gn._finalize_blocks(plan)
    split = [("split bwd reduce", gn._gn_split_bwd_reduce_kernel, dict(tiles, **flags), plan.split_warps),
             ("split bwd finalize", gn._gn_split_bwd_finalize_kernel, dict(finalize, HAS_W=True), 4),
             ("split bwd dx", gn._gn_split_bwd_dx_kernel, dict(tiles, **flags), plan.split_warps)]
    if not plan.resident_block:
        split = [("split stats", gn._gn_split_stats_kernel, tiles, plan.split_warps),
                 ("split finalize", gn._gn_split_finalize_kernel, finalize, 4),
                 ("split apply", gn._gn_split_apply_kernel, dict(tiles, **flags), plan.split_warps)] + split
    return launches + split


def compile_shape(shape, memory_format: str, dtype: str = "bf16", arch: int = 90) -> list[dict]:
    x = torch.empty(shape, device="meta")
    if memory_format == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    records = []
    for param_grads in (False, True):
        plan = gn._cached_plan(tuple(x.shape), tuple(x.stride()), 32, SMS, None, None)
        for name, fn, constexprs, warps in _launches(plan, param_grads):
            if param_grads and name.startswith(("resident fwd", "split stats", "split finalize", "split apply")):
                continue  # the forward does not depend on parameter gradients: compiled once
            if any(r["kernel"] == name for r in records):
                continue
            sig = signature(fn, constexprs, _pointers(fn, dtype), _FLOATS)
            result = compile_kernel(fn, sig, constexprs, warps, 1, arch)
            records.append({"shape": list(shape), "format": memory_format, "dtype": dtype, "arch": f"sm_{arch}",
                            "plan": plan.describe(), "kernel": name, "warps": warps, **result})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--json", help="also write the records to this file")
    args = parser.parse_args(argv)
    records = []
    for shape, fmt in (QUICK if args.quick else SHAPES):
        for record in compile_shape(shape, fmt, args.dtype, args.arch):
            records.append(record)
            print(f"{record['arch']} {args.dtype} {tuple(shape)} {fmt} [{record['plan']}] {record['kernel']}: "
                  f"{format_usage(record)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
