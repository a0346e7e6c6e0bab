"""Which decoded frames the reward sees, and which of those carry gradients."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastvader.config import parse_frame_spec


def _pick(mode: str, arg, candidates: list[int], generator: torch.Generator) -> list[int]:
    if mode in ("all", "same"):
        return list(candidates)
    if mode == "random":
        k = min(arg, len(candidates))
        order = torch.randperm(len(candidates), generator=generator)[:k].sort().values
        return [candidates[i] for i in order.tolist()]
    if mode == "stride":
        return candidates[::arg]
    chosen = [i for i in arg if i in candidates]
    return chosen


@dataclass
class FrameSelector:
    """``reward`` picks frames out of the video; ``grad`` picks, out of those, the frames that
    carry gradients (``same``: all of them). Random picks are drawn once per video."""

    reward: str
    grad: str
    num_frames: int

    def __post_init__(self):
        self._reward = parse_frame_spec(self.reward, self.num_frames, "frames.reward")
        self._grad = parse_frame_spec(self.grad, self.num_frames, "frames.grad")

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        frames = _pick(*self._reward, list(range(self.num_frames)), generator)
        grad_frames = _pick(*self._grad, frames, generator)
        if not grad_frames:
            raise ValueError(f"frames.grad={self.grad!r} selects none of the reward's frames {frames}")
        return frames, grad_frames
