"""The repeated blocks of a denoiser: the units regional compilation compiles.

Compiling each repeated block instead of the whole denoiser keeps compile time short: the
blocks of one class and shape share one compiled graph (torch.compile lifts their weights to
graph inputs), and the glue between blocks stays eager. Which classes are the blocks:

1. the classes the model declares in ``_repeated_blocks`` (diffusers' transformers, e.g.
   ``WanTransformer3DModel``: ``WanTransformerBlock``);
2. else the sub-block classes fastvader's checkpointing knows (the residual, spatial-attention,
   temporal-conv and temporal-attention units of diffusers' video UNets, VideoCrafter2 and
   Open-Sora), which UNet3DConditionModel and UNetMotionModel consist of;
3. else any class that occurs at least twice and holds modules of its own, outermost first.
"""
from __future__ import annotations

from collections import Counter

import torch.nn as nn

from fastvader.memory.checkpointing import SUB_BLOCK_TYPES

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def repeated_block_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of the blocks compiled one by one, in the order the model holds them (empty
    when it has none)."""
    return tuple(dict.fromkeys(type(m).__name__ for m in repeated_blocks(model)))


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of the repeated block classes (a block inside another block is
    compiled as part of it)."""
    present = {type(m).__name__ for m in model.modules()}
    declared = set(getattr(model, "_repeated_blocks", None) or ()) & present
    names = declared or set(SUB_BLOCK_TYPES) & present
    if names:
        return _outermost(model, lambda m: type(m).__name__ in names)
    counts = Counter(type(m).__name__ for m in model.modules())
    return _outermost(model, lambda m: counts[type(m).__name__] > 1)


def _outermost(model: nn.Module, is_block) -> list[nn.Module]:
    found, claimed = [], []
    for name, module in model.named_modules():
        if module is model or isinstance(module, _CONTAINERS) or not module._modules:
            continue
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue
        if is_block(module):
            found.append(module)
            claimed.append(name)
    return found
