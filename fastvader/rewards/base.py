"""The Reward interface: decoded videos in, one differentiable score per video out.

Videos arrive as (B, F, 3, H, W) float tensors in [0, 1] with gradients attached to the
frames that carry them. Preprocessing (resize, crop, normalise) happens inside the reward, in
torch, so gradients reach the pixels. Image rewards implement ``score_frames`` and are averaged
over the frames they receive; video rewards implement ``score_videos`` over all frames.

A reward with ``needs_reference`` also takes ``reference``: the same frames sampled by the base
model (the adapters off) from the same prompts and noise, without gradients, so it can score a
change ("recolour what the base model drew, keep the rest"). The rollout samples it; it costs one
more no-grad rollout per video.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn


class Reward(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``score_frames`` (image rewards) or
    ``score_videos`` (video rewards, ``is_video_reward = True``)."""

    name: ClassVar[str] = "reward"
    is_video_reward: ClassVar[bool] = False
    #: True when the reward needs no downloaded weights (usable in tests and the toy world)
    weightless: ClassVar[bool] = False
    #: True when scoring needs the base model's video from the same noise (``reference``)
    needs_reference: bool = False

    def score_frames(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """frames (B, F, 3, H, W) in [0, 1] -> per-frame scores (B, F)."""
        raise NotImplementedError(f"{type(self).__name__} scores whole videos, not frames")

    def score_videos(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """videos (B, F, 3, H, W) in [0, 1] -> scores (B,)."""
        return self.score_frames(videos, prompts).mean(dim=1)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str],
                reference: torch.Tensor | None = None) -> torch.Tensor:
        check_videos(videos, prompts)
        if self.needs_reference:
            if reference is None or reference.shape != videos.shape:
                raise ValueError(f"{self.name} scores a change against the base model's video: pass reference= "
                                 f"shaped {tuple(videos.shape)} (got "
                                 f"{None if reference is None else tuple(reference.shape)})")
            scores = self.score_videos(videos, prompts, reference=reference)
        else:
            scores = self.score_videos(videos, prompts)
        if scores.shape != (videos.shape[0],):
            raise RuntimeError(f"{type(self).__name__} returned shape {tuple(scores.shape)}, "
                               f"expected ({videos.shape[0]},)")
        return scores

    @classmethod
    def describe(cls) -> dict:
        """What ``fastvader models`` lists: name, kind (image | video | detection), the weights it
        expects, its constructor defaults (the YAML ``reward.options.<name>`` keys) and the
        parameter count of the real architecture (0 for weightless rewards, None if unknown)."""
        return {
            "name": cls.name,
            "kind": "video" if cls.is_video_reward else "image",
            "weights": "none (needs no downloaded weights)" if cls.weightless else "",
            "defaults": constructor_defaults(cls),
            "params": 0 if cls.weightless else None,
        }

    def freeze(self) -> "Reward":
        """Frozen reward models never accumulate parameter gradients."""
        self.requires_grad_(False)
        self.eval()
        return self


def constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword options of ``cls.__init__`` with their defaults (what a YAML config may set)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.default is not p.empty}


def check_videos(videos: torch.Tensor, prompts: Sequence[str]) -> None:
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"rewards take videos shaped (B, F, 3, H, W); got {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")


class WeightedSum(Reward):
    """sum_i w_i * reward_i: VADER's ``aesthetic_hps`` is {aesthetic: 1.0, hpsv2: 15.0}."""

    name = "weighted_sum"

    def __init__(self, terms: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError("terms and weights must name the same rewards")
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.is_video_reward = any(r.is_video_reward for r in terms.values())  # type: ignore[misc]
        self.needs_reference = any(r.needs_reference for r in terms.values())
        self.last_terms: dict[str, torch.Tensor] = {}

    def score_videos(self, videos: torch.Tensor, prompts: Sequence[str],
                     reference: torch.Tensor | None = None) -> torch.Tensor:
        if not self.terms:
            raise ValueError("a weighted sum needs at least one reward")
        total = 0.0
        self.last_terms = {}
        for key, reward in self.terms.items():
            score = reward(videos, prompts, reference if reward.needs_reference else None)
            self.last_terms[key] = score.detach()
            total = total + self.weights[key] * score
        return total  # type: ignore[return-value]


REWARDS: dict[str, type[Reward]] = {}


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: makes a reward available by its ``name`` in configs."""
    if cls.name in REWARDS and REWARDS[cls.name] is not cls:
        raise ValueError(f"a reward named {cls.name!r} is already registered")
    REWARDS[cls.name] = cls
    return cls


def build_reward_from_spec(terms: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> Reward:
    """One reward for ``{name: weight}``; a WeightedSum when there are several (or a weight != 1).
    ``options[name]`` are keyword arguments of that reward's constructor (paths, targets)."""
    from fastvader.rewards import available_rewards  # registers the built-ins

    options = options or {}
    built: dict[str, Reward] = {}
    for key in terms:
        if key not in REWARDS:
            raise ValueError(f"reward {key!r} does not exist; choose from {available_rewards()}")
        kwargs = dict(options.get(key) or {})
        accepted = constructor_defaults(REWARDS[key])
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"reward.options.{key}: {unknown} are not options of {key!r}; "
                             f"its options are {sorted(accepted)}")
        try:
            built[key] = REWARDS[key](**kwargs).freeze()
        except ValueError as err:  # an option's value the reward refuses: a user's mistake, in one line
            from fastvader.config import ConfigError

            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"config: reward.options.{key}: {err}") from None
    if len(built) == 1 and next(iter(terms.values())) == 1.0:
        return next(iter(built.values()))
    return WeightedSum(built, terms).freeze()
