"""Per-video random streams: what a step draws depends only on (seed, step, micro-batch, video),
never on how the work is split over ranks or interrupted.

Video ``g`` of micro-batch ``m`` at step ``s`` draws its prompt and its noise from its own
generator, seeded from (seed, s, m, g); rank ``r`` owns videos ``r*b .. r*b+b-1``. The number of
grad steps K and the frame choice come from a generator seeded from (seed, s, m), the same on
every rank. So 2 ranks x batch 1 draw exactly what 1 process x batch 2 draws, and a resumed run
draws what an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class BatchDraws:
    """The random streams of one micro-batch: ``shared`` (K, frame choice, sampler noise; the same
    on every rank) and one generator per video this rank owns."""

    shared: torch.Generator
    videos: list[torch.Generator]

    @classmethod
    def for_step(cls, seed: int, step: int, micro: int, rank: int, batch: int) -> "BatchDraws":
        shared = torch.Generator().manual_seed(_seed(seed, step, micro, -1))
        videos = [torch.Generator().manual_seed(_seed(seed, step, micro, g))
                  for g in range(rank * batch, (rank + 1) * batch)]
        return cls(shared, videos)

    @classmethod
    def from_generator(cls, generator: torch.Generator, batch: int) -> "BatchDraws":
        """Every draw of a ``batch``-video micro-batch from one generator, in turn (notebooks and
        tests that seed a single generator)."""
        return cls(generator, [generator] * batch)
