"""``nn.Module`` wrappers of the ops."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fastvader.kernels._checks import ACTIVATIONS
from fastvader.kernels.ops.group_norm import group_norm


class FusedGroupNormAct(nn.Module):
    """``nn.GroupNorm`` followed by an optional activation, as one fused op.

    Its parameters are named like ``nn.GroupNorm``'s (``weight``, ``bias``), so swapping it in
    leaves state_dict keys unchanged; :meth:`from_group_norm` shares the original Parameters.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, activation: Optional[str] = None) -> "FusedGroupNormAct":
        """A fused module sharing ``norm``'s Parameters (no copy; gradients land on them)."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False, activation=activation)
        fused.affine, fused.weight, fused.bias = norm.affine, norm.weight, norm.bias
        fused.train(norm.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation}")
