"""Differentiable rewards that need no downloaded weights: the embedded world's rewards, and
handy sanity checks for any backbone."""
from __future__ import annotations

from typing import Sequence

import torch

from fastvader.rewards.base import Reward, register_reward

_NAMED_COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "orange": (1.0, 0.5, 0.0),
}


def _parse_color(reward_name: str, color: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(color, str):
        if color not in _NAMED_COLORS:
            raise ValueError(f"{reward_name}.color={color!r} is not a known colour; use one of "
                             f"{sorted(_NAMED_COLORS)} or an RGB triple")
        return _NAMED_COLORS[color]
    rgb = tuple(float(c) for c in color)
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"{reward_name}.color must be 3 values in [0, 1]; got {color!r}")
    return rgb  # type: ignore[return-value]


@register_reward
class TargetColorReward(Reward):
    """Minus the mean squared distance of every pixel to a target RGB colour: rises as the
    video turns toward the colour. ``color`` is a name or an RGB triple in [0, 1].

    In the embedded world the background covers most of the frame, so this reward mostly
    repaints the background (0 would be a frame of pure target colour; a gray frame scores
    about -0.25 against red)."""

    name = "target_color"
    weightless = True

    def __init__(self, color: str | Sequence[float] = "red"):
        super().__init__()
        rgb = _parse_color(self.name, color)
        self.register_buffer("target", torch.tensor(rgb).view(1, 1, 3, 1, 1), persistent=False)

    def score_frames(self, frames, prompts):
        return -((frames - self.target.to(frames)) ** 2).mean(dim=(2, 3, 4))


@register_reward
class ObjectColorReward(Reward):
    """Minus the mean squared distance to a target colour over the *foreground* only: the
    pixels that differ from the frame's background (its per-channel median) by more than
    ``threshold``, weighted softly. Aligning with it recolours the moving object and leaves the
    background alone, unlike ``target_color``.

    The mask is computed from the frames but detached: gradients move the object's colour, and
    cannot raise the score by shrinking or growing the mask. A frame with no foreground scores
    as if all of it were foreground (the whole-frame distance), so erasing the object never pays."""

    name = "object_color"
    weightless = True

    def __init__(self, color: str | Sequence[float] = "red", threshold: float = 0.15,
                 sharpness: float = 40.0):
        super().__init__()
        rgb = _parse_color(self.name, color)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"object_color.threshold must be in (0, 1); got {threshold}")
        self.threshold, self.sharpness = float(threshold), float(sharpness)
        self.register_buffer("target", torch.tensor(rgb).view(1, 1, 3, 1, 1), persistent=False)

    def foreground_weights(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, H, W) in (0, 1), detached."""
        with torch.no_grad():
            background = frames.flatten(3).median(dim=3).values[..., None, None]
            difference = (frames - background).abs().amax(dim=2)
            return torch.sigmoid(self.sharpness * (difference - self.threshold))

    def score_frames(self, frames, prompts):
        weights = self.foreground_weights(frames)
        distance = ((frames - self.target.to(frames)) ** 2).mean(dim=2)  # (B, F, H, W)
        total = weights.sum(dim=(2, 3))
        object_score = -(weights * distance).sum(dim=(2, 3)) / total.clamp_min(1e-6)
        whole_frame = -distance.mean(dim=(2, 3))
        return torch.where(total > 1.0, object_score, whole_frame)


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
