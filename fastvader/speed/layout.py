"""channels_last for the denoiser's 2D convolutions.

cuDNN runs NHWC convolutions faster than NCHW ones on tensor-core GPUs, and a convolution whose
weight is channels_last writes a channels_last output, so the activations between the
convolutions follow (fastvader's GroupNorm kernel reads that layout without a copy). Only
``nn.Conv2d`` weights change: the temporal ``Conv3d`` of video UNets (kernel 3x1x1) takes its
input from a frame-major permute, where NHWC buys nothing.

The Parameters stay the same objects (an optimizer holding them is unaffected); their storage
is rewritten in the new layout, and ``revert()`` rewrites it back to the layout it had.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ChannelsLast:
    """The weights of every ``nn.Conv2d`` in ``model`` that were contiguous, made channels_last."""

    def __init__(self, model: nn.Module):
        self.weights: list[nn.Parameter] = []
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Conv2d) and isinstance(weight, torch.Tensor) and weight.is_contiguous():
                weight.data = weight.data.contiguous(memory_format=torch.channels_last)
                self.weights.append(weight)

    def describe(self) -> str:
        return f"{len(self.weights)} Conv2d weight(s) in channels_last"

    def revert(self) -> int:
        for weight in self.weights:
            weight.data = weight.data.contiguous()
        count, self.weights = len(self.weights), []
        return count
