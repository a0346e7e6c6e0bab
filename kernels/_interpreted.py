"""What only the Triton interpreter needs, behind the one ``INTERPRETED`` constexpr of the
attention kernels (v1 and v2).

The interpreter multiplies raw bits for bf16 dots (so dot operands are upcast to fp32 there),
and its float conversions are slow Python loops (so bf16 tensors come in as int16 bit patterns,
:func:`interpreter_view`, and are widened by moving bits). Compiled kernels take
INTERPRETED=False, and none of this code exists in them.
"""
from __future__ import annotations

import torch

from fastvader.kernels._triton import tl, triton


def interpreter_view(t: torch.Tensor | None, interpreted: bool) -> torch.Tensor | None:
    """Interpreted, a bf16 tensor goes in as an int16 view of the same memory (no copy); the
    kernel moves the bits itself (see ``to_fp32``)."""
    if t is None or not interpreted or t.dtype != torch.bfloat16:
        return t
    return t.view(torch.int16)


if triton is not None:

    @triton.jit
    def to_fp32(x, INTERPRETED: tl.constexpr):
        """fp32 copy of a loaded tile; interpreted, int16 tiles hold bf16 bit patterns."""
        if INTERPRETED:
            if x.dtype == tl.int16:
                return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return x.to(tl.float32)

    @triton.jit
    def dot_operand(x, INTERPRETED: tl.constexpr):
        """A loaded tile as a tl.dot operand: as loaded when compiled, fp32 when interpreted."""
        if INTERPRETED:
            return to_fp32(x, INTERPRETED)
        return x

    @triton.jit
    def for_store(x, Ptr, INTERPRETED: tl.constexpr):
        """``x`` in the element type of ``Ptr``; interpreted, an int16 ``Ptr`` takes bf16 bit
        patterns, rounded to nearest even."""
        if INTERPRETED:
            if Ptr.dtype.element_ty == tl.int16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + (((bits >> 16) & 1) + 0x7FFF)
                return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        return x.to(Ptr.dtype.element_ty)

    @triton.jit
    def probs_operand(p, Ptr, INTERPRETED: tl.constexpr):
        """An fp32 tile computed in the kernel (probabilities, score gradients) as the other
        operand of a dot with tiles loaded from ``Ptr``: in their element type when compiled (bf16
        and fp16 dots on tensor cores), fp32 when interpreted (the loaded tiles are fp32 there)."""
        if INTERPRETED:
            return p
        return p.to(Ptr.dtype.element_ty)
