"""fp8 matmuls for the no-grad denoiser calls (opt-in: ``speed.fp8_rollout``), through torchao.

Each frozen ``nn.Linear`` whose sizes fp8 matmuls take (multiples of 16) gets a shadow: a
Linear sharing its bias, holding its weight quantized to float8 e4m3 per output row, with
activations quantized per row on the fly (torchao's
``Float8DynamicActivationFloat8WeightConfig``). The Linear's ``forward`` is wrapped (through
:class:`fastvader.patching.core.Patches`): calls without gradients run the shadow, calls with
gradients the original weight, so the gradient-carrying steps stay in the training precision.
LoRA layers (peft's ``lora_A``/``lora_B``) keep their own precision; their base layer is
quantized like any frozen Linear. The shadows cost one byte per quantized weight.

Needs a GPU with fp8 matmuls (compute capability 8.9+: Ada, Hopper, Blackwell) and torchao.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from fastvader.patching.core import InstanceAttr, Patches

#: fp8 matmuls (torch._scaled_mm) take sizes that are multiples of this
FP8_MULTIPLE = 16
FP8_CAPABILITY = (8, 9)


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return f"fp8 matmuls need a CUDA GPU of compute capability 8.9+ (Ada, Hopper); this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}) has no fp8 matmuls; "
                "they need compute capability 8.9+ (Ada, Hopper)")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        return f"torchao is not installed ({err}); pip install torchao"
    return None


def torchao_fp8(linear: nn.Linear) -> nn.Module:
    """A Linear holding ``linear``'s weight as torchao float8 (per-row scales, dynamic per-row
    activation scales) and sharing its bias; ``linear`` itself is untouched."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    shadow = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    shadow.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    shadow.bias = linear.bias
    # set_inductor_config=False: torchao would otherwise change inductor's global settings
    quantize_(shadow, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return shadow


def _quantizable(name: str, module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not module.weight.requires_grad and "lora_" not in name
            and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0)


class NoGradFp8:
    """The fp8 shadows of ``model``'s frozen Linears, used by its calls without gradients.
    ``quantize`` makes a shadow from a Linear (default: :func:`torchao_fp8`)."""

    def __init__(self, model: nn.Module, quantize: Callable[[nn.Linear], nn.Module] = torchao_fp8):
        self.patches = Patches()
        self.shadows: list[nn.Module] = []
        for name, module in list(model.named_modules()):
            if _quantizable(name, module):
                shadow = quantize(module)
                self.shadows.append(shadow)
                self.patches.wrap(InstanceAttr(module, "forward"), _no_grad_through(shadow))

    def describe(self) -> str:
        return f"{len(self.shadows)} Linear layer(s) in fp8 for calls without gradients"

    def revert(self) -> int:
        self.shadows = []
        return self.patches.revert()


def _no_grad_through(shadow: nn.Module):
    def make(below):
        def forward(x, *args, **kwargs):
            if torch.is_grad_enabled():
                return below()(x, *args, **kwargs)
            return shadow(x)
        return forward
    return make
