"""Differentiable rewards that need no downloaded weights: the embedded world's rewards, and
handy sanity checks for any backbone."""
from __future__ import annotations

import math
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


def _checked_threshold(reward_name: str, threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{reward_name}.threshold must be in (0, 1); got {threshold}")
    return float(threshold)


def _register_target(reward: Reward, color: str | Sequence[float]) -> None:
    """The target colour as a (1, 1, 3, 1, 1) buffer ``target``, broadcasting over (B, F, 3, H, W)."""
    rgb = _parse_color(reward.name, color)
    reward.register_buffer("target", torch.tensor(rgb).view(1, 1, 3, 1, 1), persistent=False)


def difference_from_background(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B, F, H, W), detached: how far each pixel is from its frame's
    background (the per-channel median: the background covers most of every frame), largest over
    the channels."""
    with torch.no_grad():
        background = frames.flatten(3).median(dim=3).values[..., None, None]
        return (frames - background).abs().amax(dim=2)


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
        _register_target(self, color)

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
        _register_target(self, color)
        self.threshold, self.sharpness = _checked_threshold(self.name, threshold), float(sharpness)

    def foreground_weights(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, H, W) in (0, 1), detached."""
        return torch.sigmoid(self.sharpness * (difference_from_background(frames) - self.threshold))

    def score_frames(self, frames, prompts):
        weights = self.foreground_weights(frames)
        distance = ((frames - self.target.to(frames)) ** 2).mean(dim=2)  # (B, F, H, W)
        total = weights.sum(dim=(2, 3))
        object_score = -(weights * distance).sum(dim=(2, 3)) / total.clamp_min(1e-6)
        whole_frame = -distance.mean(dim=(2, 3))
        return torch.where(total > 1.0, object_score, whole_frame)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> the largest 8-connected region of each mask (empty where a mask is).
    Every pixel starts with its own label and takes the largest label among its neighbours
    until nothing changes; then the most frequent label per mask wins."""
    if mask.is_meta:  # the planner's shape-only dry run: no values to label
        return mask
    n, h, w = mask.shape
    pixel_ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, h, w)
    labels = pixel_ids * mask
    while True:
        grown = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    ids = labels.long().flatten(1)
    sizes = torch.zeros(n, h * w + 1, device=mask.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    sizes[:, 0] = 0  # the background is no region
    return (labels == sizes.argmax(dim=1).view(n, 1, 1)) & mask


@register_reward
class ObjectRecolorReward(Reward):
    """Recolour the object and change nothing else: minus the squared distance to the target
    colour over the object's pixels, minus the squared change of every other pixel from the
    frame's background colour, both summed and divided by the object's area (so a stray pixel
    costs as much as an off-colour object pixel). 0 is a target-coloured object on an untouched
    background.

    The object is the largest connected region of pixels farther than ``threshold`` from the
    frame's background (its per-channel median); that mask and the background colour are
    detached. Compared with ``object_color``, whose soft mask also leaks a little gradient toward
    the target colour onto every background pixel and which pays for any stray target-coloured
    pixel, halos and spots here are background and are pulled back to it.
    ``background_weight`` scales the background term (0 leaves only the object term).

    ``anchor`` says what the change is measured against. ``frame`` (above) reads the object and the
    background from the scored video itself, so any red shape on an untouched background scores 0,
    whatever its outline. ``base`` reads them from the base model's video from the same prompt and
    noise (the rollout passes it as ``reference``): the object is the base video's object, and every
    other pixel should stay as the base model drew it. Then 0 is exactly "the base model's video
    with its object painted red": a changed outline, a fragment or a halo costs as much per pixel
    as an off-colour object pixel, and only recolouring pays. The price is one more no-grad rollout
    per video."""

    name = "object_recolor"
    weightless = True

    def __init__(self, color: str | Sequence[float] = "red", threshold: float = 0.15,
                 background_weight: float = 1.0, anchor: str = "frame"):
        super().__init__()
        _register_target(self, color)
        if background_weight < 0:
            raise ValueError(f"object_recolor.background_weight must be >= 0; got {background_weight}")
        if anchor not in ("frame", "base"):
            raise ValueError(f"object_recolor.anchor must be 'frame' or 'base'; got {anchor!r}")
        self.threshold, self.background_weight = _checked_threshold(self.name, threshold), float(background_weight)
        self.anchor = anchor
        self.needs_reference = anchor == "base"

    def object_mask(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, H, W) bool: the largest region away from the background."""
        foreground = difference_from_background(frames) > self.threshold
        return largest_component(foreground.flatten(0, 1)).view_as(foreground)

    def score_videos(self, videos, prompts, reference=None):
        return self.score_frames(videos, prompts, reference).mean(dim=1)

    def score_frames(self, frames, prompts, reference=None):
        anchor = reference if self.anchor == "base" else frames
        with torch.no_grad():
            obj = self.object_mask(anchor).to(frames.dtype)
            # what every pixel off the object should stay: the base video's pixels, or the frame's background colour
            kept = anchor.detach() if self.anchor == "base" else frames.flatten(3).median(dim=3).values[..., None, None]
        off_target = ((frames - self.target.to(frames)) ** 2).mean(dim=2)  # (B, F, H, W)
        changed = ((frames - kept) ** 2).mean(dim=2)
        area = obj.sum(dim=(2, 3))
        cost = (obj * off_target).sum(dim=(2, 3)) + self.background_weight * ((1 - obj) * changed).sum(dim=(2, 3))
        # a frame without an object: anchored on itself, it scores as if all of it were the object
        # (erasing the object never pays); anchored on a base frame without one, it should stay that frame
        empty = changed if self.anchor == "base" else off_target
        return torch.where(area >= 1.0, -cost / area.clamp_min(1.0), -empty.mean(dim=(2, 3)))


@register_reward
class ObjectCompactnessReward(Reward):
    """How compact the foreground is, per frame: A^2 / (2 pi J), where A is the foreground's area
    and J its polar moment of inertia about its centroid (the pixels farther than ``threshold``
    from the frame's background, as ``object_color`` counts them).
    A disc scores 1 (the most compact shape), a square 0.95, a triangle 0.83; halos, scattered
    spots and an object breaking into fragments spread the foreground and pull the score toward
    0, as does a frame with no foreground. A hacking detector for the embedded world
    (``safeguards.second_reward``), not a training reward: it has no gradient."""

    name = "object_compactness"
    weightless = True

    def __init__(self, threshold: float = 0.15):
        super().__init__()
        self.threshold = _checked_threshold(self.name, threshold)

    def score_frames(self, frames, prompts):
        # a hard mask: a soft one leaves a little weight on every far background pixel, and the
        # moment of inertia weighs those by their squared distance
        weights = (difference_from_background(frames) > self.threshold).to(frames.dtype)  # (B, F, H, W)
        h, w = weights.shape[-2:]
        ys = torch.arange(h, dtype=weights.dtype, device=weights.device).view(h, 1)
        xs = torch.arange(w, dtype=weights.dtype, device=weights.device).view(1, w)
        area = weights.sum(dim=(2, 3)).clamp_min(1e-6)
        cy = (weights * ys).sum(dim=(2, 3)) / area
        cx = (weights * xs).sum(dim=(2, 3)) / area
        spread = (weights * ((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2)).sum(dim=(2, 3))
        # a pixel is a unit square, not a point: add its own moment (1/6) so one pixel is not "infinitely" compact
        inertia = spread + area / 6.0
        return (area ** 2 / (2 * math.pi * inertia)).clamp(max=1.0) * (area >= 1.0)


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
