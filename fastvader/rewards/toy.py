"""Differentiable rewards that need no downloaded weights: the embedded world's rewards, and
handy sanity checks for any backbone."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Reward, register_reward

_NAMED_COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "orange": (1.0, 0.5, 0.0),
}


@register_reward
class TargetColorReward(Reward):
    """Minus the mean squared distance of every pixel to a target RGB colour: rises as the
    video turns toward the colour. ``color`` is a name or an RGB triple in [0, 1]."""

    name = "target_color"
    weightless = True

    def __init__(self, color: str | Sequence[float] = "red"):
        super().__init__()
        if isinstance(color, str):
            if color not in _NAMED_COLORS:
                raise ValueError(f"target_color.color={color!r} is not a known colour; use one of "
                                 f"{sorted(_NAMED_COLORS)} or an RGB triple")
            rgb = _NAMED_COLORS[color]
        else:
            rgb = tuple(float(c) for c in color)
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"target_color.color must be 3 values in [0, 1]; got {color!r}")
        self.register_buffer("target", torch.tensor(rgb).view(1, 1, 3, 1, 1), persistent=False)

    def score_frames(self, frames, prompts):
        return -((frames - self.target.to(frames)) ** 2).mean(dim=(2, 3, 4))


@register_reward
class BrightnessReward(Reward):
    """Mean luminance (Rec. 601) of the frames."""

    name = "brightness"
    weightless = True

    def score_frames(self, frames, prompts):
        luma = 0.299 * frames[:, :, 0] + 0.587 * frames[:, :, 1] + 0.114 * frames[:, :, 2]
        return luma.mean(dim=(2, 3))


@register_reward
class ContrastReward(Reward):
    """Standard deviation of luminance within each frame."""

    name = "contrast"
    weightless = True

    def score_frames(self, frames, prompts):
        luma = 0.299 * frames[:, :, 0] + 0.587 * frames[:, :, 1] + 0.114 * frames[:, :, 2]
        return luma.flatten(2).std(dim=2)


@register_reward
class TemporalSmoothnessReward(Reward):
    """Minus the mean squared change between consecutive frames (0 for a still video)."""

    name = "temporal_smoothness"
    is_video_reward = True
    weightless = True

    def score_videos(self, videos, prompts):
        if videos.shape[1] < 2:
            return videos.new_zeros(videos.shape[0])
        return -((videos[:, 1:] - videos[:, :-1]) ** 2).mean(dim=(1, 2, 3, 4))
