"""Compile the temporal-attention kernels for a CUDA target without a GPU, and report registers
and spills per configuration (what the launcher would pick for each benchmark shape).

    python benchmarks/compile_temporal_attention.py            # sm_90 (H100/H200)
    python benchmarks/compile_temporal_attention.py --arch 80  # A100

The Triton interpreter is lenient (3-D dots, layouts, register pressure never matter there);
this runs the real compiler down to a cubin with the ptxas bundled in the triton wheel, so
compile errors and register spills show up on a CPU-only machine. Slow: tens of seconds per
configuration on a busy machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton is imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastvader.kernels.ops.temporal_attention import (  # noqa: E402
    _padded_dims,
    _pick_block_rows,
    _q_block,
    _temporal_attn_bwd_kernel,
    _temporal_attn_fwd_kernel,
)

# (N, F, C, heads) of benchmarks/gpu_temporal_attention.py, by distinct padded tile
SHAPES = [(4608, 16, 320, 5), (4096, 16, 320, 8), (288, 16, 1280, 20), (4608, 24, 320, 5),
          (4608, 51, 320, 5), (4608, 16, 1280, 8)]
_SCALARS = {"qk_scale_log2": "fp32", "scale": "fp32"}
_POINTERS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = f"*{dtype}"
        elif name in ("Bias", "Lse", "DBias"):
            sig[name] = "*fp32"
        else:
            sig[name] = _SCALARS.get(name, "i32")
    return sig


def _usage(kernel) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    fields = dict(tok.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for tok in line.split() if ":" in tok)
    return f"regs {fields.get('REG', '?'):>3} spill-stack {fields.get('STACK', '?'):>5}"


def compile_shape(n, f, c, heads, dtype="bf16", arch=90, with_bias=True):
    f_pad, d_pad = _padded_dims(f, c // heads)
    target = GPUTarget("cuda", arch, 32)
    results = []
    for backward, fn in ((False, _temporal_attn_fwd_kernel), (True, _temporal_attn_bwd_kernel)):
        bn, warps = _pick_block_rows(n, f_pad, d_pad, backward=backward, interpret=False)
        constexprs = dict(HAS_BIAS=with_bias, INTERPRETED=False,
                          INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                          BLOCK_N=bn, F_PAD=f_pad, D_PAD=d_pad, Q_BLOCK=_q_block(f_pad))
        if backward:
            constexprs.update(BIAS_GRAD=with_bias, BIAS_GRAD_PER_ROW=False)
        kernel = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs),
                                target=target, options={"num_warps": warps, "num_stages": 1})
        results.append(f"{'bwd' if backward else 'fwd'} rows {bn:>2} warps {warps} {_usage(kernel)}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--frames", type=int, nargs="*", help="only the shapes with these F")
    args = parser.parse_args(argv)
    for n, f, c, heads in SHAPES:
        if args.frames and f not in args.frames:
            continue
        for line in compile_shape(n, f, c, heads, args.dtype, args.arch):
            print(f"sm_{args.arch} {args.dtype} (N={n}, F={f}, C={c}, heads={heads}): {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
