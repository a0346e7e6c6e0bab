"""Activation checkpointing as a patch: a module's ``forward`` is wrapped so that, when gradients
are on, only its inputs are kept and its inside is recomputed in backward; no-grad calls run the
forward untouched.

The wrappers go through :class:`fastvader.patching.core.Patches` like the kernel patches, as
wrapper layers: a wrapper calls whatever forward lies beneath it at call time (the class's, or
one that ``fastvader.apply`` fused), and reverting either patch leaves the other in place.
Which modules to wrap is a memory policy: :func:`fastvader.memory.checkpointing.checkpoint_units`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastvader.patching.core import InstanceAttr, Patches


class CheckpointedForward:
    """A module's forward under non-reentrant checkpointing when gradients are on. ``hits``
    counts those calls: the startup self-check reads it to tell that checkpointing engaged."""

    def __init__(self, below: Callable[[], Callable]):
        self.below = below
        self.hits = 0

    def __call__(self, *args, **kwargs):
        forward = self.below()
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        self.hits += 1
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class CheckpointWrappers:
    """Checkpoint wrappers on ``modules``, in place; ``revert()`` takes them off again."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = list(modules)
        self.patches = Patches()
        self.forwards: list[CheckpointedForward] = [
            self.patches.wrap(InstanceAttr(module, "forward"), CheckpointedForward).value for module in self.modules]

    def hits(self) -> list[int]:
        """Checkpointed calls so far, one count per wrapped module."""
        return [forward.hits for forward in self.forwards]

    def revert(self) -> int:
        return self.patches.revert()
