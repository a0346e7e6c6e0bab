"""Compile a ``@triton.jit`` kernel for a CUDA target on a machine without a GPU (the ptxas and
cuobjdump bundled in the triton wheel), and read its registers, spills and shared memory.

The Triton interpreter is lenient (layouts, dot shapes and register pressure never matter
there); the real compiler is not. Used by benchmarks/compile_temporal_attention.py and
benchmarks/compile_group_norm.py. TRITON_INTERPRET must be unset before triton is imported:
import this module first.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton is imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def signature(fn, constexprs: dict, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict:
    """Triton's signature of ``fn``: 'constexpr' for ``constexprs``, the given pointer types,
    fp32 for ``floats`` and i32 for every other argument."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK (spill stack bytes), LOCAL and SHARED of a cubin, from cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    fields = dict(tok.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for tok in line.split() if ":" in tok)
    return {k: int(fields[k]) for k in ("REG", "STACK", "LOCAL") if k in fields}


def compile_kernel(fn, sig: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile one configuration down to a cubin: registers per thread, spill stack bytes, shared
    memory bytes (dynamic, from Triton's metadata) and compile seconds; or the compiler's error."""
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as err:  # noqa: BLE001  (reported per configuration)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    usage = resource_usage(kernel.asm["cubin"])
    return {"regs": usage.get("REG"), "spill_bytes": usage.get("STACK", 0), "shared_bytes": kernel.metadata.shared,
            "seconds": round(time.perf_counter() - t0, 1)}


def format_usage(result: dict) -> str:
    if "error" in result:
        return f"COMPILE ERROR {result['error']}"
    return (f"regs {result['regs']:>3} spill {result['spill_bytes']:>5} B shared {result['shared_bytes'] // 1024:>3} KiB"
            f" ({result['seconds']} s)")
