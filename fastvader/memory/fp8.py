"""fp8 storage of the denoiser's frozen base weights (``memory.fp8_weights``).

Each ``nn.Linear`` inside the transformer blocks becomes an :class:`Fp8Linear`: its weight is
stored in float8 e4m3 (one byte a weight) with one fp32 scale per output channel, and is
dequantised layer by layer in the forward, into the compute dtype, just before its matmul. The
LoRA adapters (peft layers wrapping the base Linear) stay in their own dtype (fp32 in training).

Which layers stay in the weight dtype (bf16 on a GPU) is a named rule: everything outside the
repeated transformer blocks (patch and text/time embeddings, the first and last projections,
norms and modulation tables) and, inside the blocks, every layer that is not an ``nn.Linear``
(norms, convolutions) or whose name matches ``memory.fp8_keep_bf16`` (fnmatch patterns on the
module name in the denoiser, e.g. ``blocks.0.*`` or ``*.ffn.*``).

Why our own layer and not a library's. diffusers' layerwise casting
(``enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)``) stores the weights unscaled:
a Linear at PyTorch's default init (|w| < 1/sqrt(fan_in), 0.014 for 5120 inputs) sits below
e4m3's smallest normal number (2^-6) and loses most of its mantissa (docs/memory.md measures
it). torchao's fp8 weight-only configs are tensor subclasses built for inference, and torchao
is not a dependency. This layer is ~100 lines: per-channel scales, a backward that
dequantises again instead of saving a bf16 copy, and a plain ``nn.Linear`` subclass so that
peft's LoRA wraps it like any Linear.

The stored weight is a ``uint8`` parameter holding the e4m3 bits: ``Module.to(dtype)`` casts
every floating tensor, and would otherwise turn the fp8 weights back into bf16. The scales
stay fp32 through such casts too (:meth:`Fp8Linear._apply`).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvader.patching.core import ModuleClass, ModuleTensor, Patches

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
#: e4m3 keeps 3 mantissa bits: rounding a normal number errs by at most half an ulp, 2^-4 of it
E4M3_RELATIVE_ERROR = 2.0 ** -4
#: below the smallest normal (2^-6) the step is the smallest subnormal, 2^-9: at most 2^-10 off
E4M3_ABSOLUTE_ERROR = 2.0 ** -10


def quantize_e4m3(weight: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (e4m3 bits as uint8 (out, in), fp32 scale (out, 1)) with one scale per
    output channel: the channel's largest magnitude maps to e4m3's largest number, 448. The one
    full-size temporary, an fp32 copy scaled in place, lives in ``work`` when given (a uint8
    buffer of at least 4 bytes a weight, reused across tensors by the streaming loader)."""
    if work is None:
        w = weight.detach().to(torch.float32, copy=True)
    else:
        w = work[: weight.numel() * 4].view(torch.float32).view(weight.shape).copy_(weight)
    low, high = torch.aminmax(w, dim=1, keepdim=True)
    scale = (torch.maximum(-low, high) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    bits = w.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8)
    return bits, scale


def dequantize_e4m3(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``: bits * scale (e4m3 values are exact in bf16, fp16 and fp32)."""
    return bits.view(E4M3).to(dtype) * scale.to(dtype)


def e4m3_error_bound(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The most :func:`quantize_e4m3` may change each element (fp32 dequantisation)."""
    return E4M3_RELATIVE_ERROR * weight.abs() + E4M3_ABSOLUTE_ERROR * scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantised from fp8; backward dequantises W again rather than keep a
    bf16 copy of it. The base weight and bias are frozen: only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, bits, scale, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(bits, scale)
        ctx.input_dtype = x.dtype
        return F.linear(x.to(dtype), dequantize_e4m3(bits, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        bits, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_e4m3(bits, scale, grad_out.dtype)
        return grad_x.to(ctx.input_dtype), None, None, None


class Fp8Linear(nn.Linear):
    """A frozen Linear stored in e4m3 with per-output-channel fp32 scales (see the module doc).

    ``weight``: uint8 (out, in), the e4m3 bits; ``weight_scale``: fp32 (out, 1); ``bias`` in the
    weight dtype. A subclass of ``nn.Linear`` so that peft wraps it; peft reads ``weight`` only for
    its device (its dtype is not floating, so adapters keep their own)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def load_weight(self, weight: torch.Tensor, work: torch.Tensor | None = None) -> None:
        """Quantise a full-precision (out, in) weight into this layer (on the weight's device;
        ``work``: see :func:`quantize_e4m3`)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an Fp8Linear({self.in_features}, "
                             f"{self.out_features})")
        bits, scale = quantize_e4m3(weight, work)
        self.weight = nn.Parameter(bits, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, quantised (random-weight models built layer by layer)."""
        weight = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.load_weight(weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            self.bias.data = torch.empty_like(self.bias, device=self.weight.device).uniform_(-bound, bound)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_e4m3(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):
        """Moves follow ``fn``; dtype casts leave the scales in fp32 (the uint8 bits are never cast)."""
        scale = self.weight_scale.data  # _apply replaces the parameter's data, not the parameter
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale.data = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage=float8_e4m3fn, scale=per output channel"


# ---------------------------------------------------------------------------------------------
# which layers, and converting them
# ---------------------------------------------------------------------------------------------
def _is_base_linear(name: str, module: nn.Module) -> bool:
    """An ``nn.Linear`` holding base weights (peft's own lora_A / lora_B are Linears too)."""
    return type(module) is nn.Linear and not any(part.startswith("lora_") for part in name.split("."))


def fp8_candidates(denoiser: nn.Module, keep_bf16: Iterable[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(name in the denoiser, layer) of every layer the rule stores in fp8:
    the base ``nn.Linear`` layers inside the transformer blocks whose names match none of
    ``keep_bf16`` (a peft wrapper's ``.base_layer`` is left out of the name matched)."""
    from fastvader.memory.block_swap import transformer_blocks

    patterns = list(keep_bf16)
    names = {id(m): n for n, m in denoiser.named_modules()}
    for block in transformer_blocks(denoiser):
        for name, module in block.named_modules(prefix=names[id(block)]):
            matched = name.removesuffix(".base_layer")
            if _is_base_linear(name, module) and not any(fnmatch.fnmatchcase(matched, p) for p in patterns):
                yield matched, module


@dataclass(frozen=True)
class Fp8Storage:
    """The fp8 rule of a run: ``keep_bf16`` patterns (see the module doc)."""

    keep_bf16: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, memory_cfg) -> "Fp8Storage | None":
        return cls(tuple(memory_cfg.fp8_keep_bf16)) if memory_cfg.fp8_weights else None

    def convert(self, denoiser: nn.Module, patches: Patches | None = None) -> int:
        """Turn each candidate Linear into an :class:`Fp8Linear` in place (same object: a LoRA
        wrapper made later wraps it); returns how many. The weight is quantised (on the meta
        device too: a skeleton a loader fills later). With ``patches`` the changes are recorded
        (``patches.revert()`` restores the class and the original weight, which stays alive
        meanwhile, wherever it was); without, they are final (a model fastvader built itself)."""
        layers = [linear for _, linear in fp8_candidates(denoiser, self.keep_bf16)]
        for linear in layers:
            bits, scale = quantize_e4m3(linear.weight)
            changes = ((ModuleTensor(linear, "weight"), nn.Parameter(bits, requires_grad=False)),
                       (ModuleTensor(linear, "weight_scale"), nn.Parameter(scale, requires_grad=False)),
                       (ModuleClass(linear), Fp8Linear))
            for slot, value in changes:
                if patches is None:
                    slot.write(value)
                else:
                    patches.replace(slot, value)
        return len(layers)
