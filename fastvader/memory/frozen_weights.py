"""How a run holds the denoiser's frozen base weights: fp8 storage (:mod:`fastvader.memory.fp8`)
and block swap (:mod:`fastvader.memory.block_swap`). The Trainer sets it up once the backbone is
built and before it moves to the GPU, so that swapped blocks never have to fit on the card."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastvader.config import ConfigError
from fastvader.memory.block_swap import BlockSwap, last_blocks, transformer_blocks
from fastvader.memory.fp8 import Fp8Storage
from fastvader.patching.core import Patches


def check_blocks_engage(denoiser: nn.Module, memory_cfg) -> list[nn.Module]:
    """The denoiser's transformer blocks; a ConfigError when fp8 or block swap is asked for and
    the denoiser has none (a UNet), so the setting cannot engage."""
    blocks = transformer_blocks(denoiser)
    asked = [f"memory.{name}={value!r}" for name, value in (("fp8_weights", memory_cfg.fp8_weights),
                                                             ("block_swap", memory_cfg.block_swap)) if value]
    if asked and not blocks:
        raise ConfigError(f"config: {', '.join(asked)} cannot engage: this {type(denoiser).__name__} has no "
                          "repeated transformer blocks (fp8 storage and block swap work on DiT denoisers: wan, "
                          "opensora); set them back to false / 0")
    return blocks


def _check_checkpoint_units(denoiser: nn.Module, swapped: list[nn.Module], policy: str) -> None:
    """A checkpointed unit strictly inside a swapped block would be recomputed in backward
    without its block's weights: refuse that combination."""
    from fastvader.memory.checkpointing import checkpoint_units

    inside = {id(m) for block in swapped for m in block.modules() if m is not block}
    if any(id(unit) in inside for unit in checkpoint_units(denoiser, policy)):
        raise ConfigError(f"config: memory.block_swap with memory.checkpointing={policy!r}: the checkpointed units "
                          "are smaller than the swapped blocks; use checkpointing block, sub_block, step or none")


class FrozenWeights:
    """fp8 conversion of a backbone passed in prebuilt (recorded, so ``revert`` restores it; a
    backbone the run builds is built straight into fp8 by ``build_backbone``) and the block swap.
    ``block_swap`` here is a resolved count (the planner turns ``auto`` into one)."""

    def __init__(self, denoiser: nn.Module, memory_cfg, device: torch.device, *, passed_in: bool):
        self.fp8_patches: Patches | None = None
        self.block_swap: BlockSwap | None = None
        blocks = check_blocks_engage(denoiser, memory_cfg)
        storage = Fp8Storage.from_config(memory_cfg)
        if storage is not None and passed_in:
            self.fp8_patches = Patches()
            storage.convert(denoiser, self.fp8_patches)
        count = memory_cfg.block_swap
        if count == "auto":
            raise ConfigError("config: memory.block_swap='auto' was not resolved: plan with memory.gpu_memory "
                              "(or on a CUDA device), or give a number")
        if count > len(blocks):
            raise ConfigError(f"config: memory.block_swap={count} is invalid: this denoiser has {len(blocks)} "
                              f"transformer blocks; swap at most {len(blocks)}")
        if count:
            swapped = last_blocks(len(blocks), count)
            _check_checkpoint_units(denoiser, [blocks[i] for i in swapped], memory_cfg.checkpointing)
            self.block_swap = BlockSwap(blocks, swapped, pin_memory=device.type == "cuda")

    def revert(self) -> None:
        """Undo the block swap (weights back beside the model) and the recorded fp8 conversion."""
        if self.block_swap is not None:
            self.block_swap.revert()
            self.block_swap = None
        if self.fp8_patches is not None:
            self.fp8_patches.revert()
            self.fp8_patches = None
