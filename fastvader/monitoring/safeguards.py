"""Reward-hacking safeguards. Reward-gradient training can raise its reward while the videos get
worse (one oversaturated look for every prompt). Three defences:

- held-out scoring: every validation round scores the validation (held-out) prompts with the
  training reward AND, optionally, a second reward the run never optimises;
- early stopping: when the held-out training reward stops rising for ``early_stop_patience``
  rounds, or the second reward falls more than ``second_reward_max_drop`` below its first round;
- a regulariser keeping the aligned model near the base: ``regularizer=denoiser`` adds
  ``weight * mean((eps_lora - eps_base)^2)`` over the gradient-carrying denoiser calls, where
  ``eps_base`` is the same call with the adapters switched off (no gradient through it);

plus a first/middle/last-frame grid per validation round under ``samples/`` and in the logs.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from fastvader.lora import adapters_disabled


class BaseModelRegularizer:
    """Wraps each gradient-carrying denoiser call (``Sampler.grad_step_wrapper`` protocol) and
    accumulates the penalty on the LoRA's effect on its output; ``pop()`` hands the weighted sum
    to the loss and resets it."""

    def __init__(self, denoiser: nn.Module, weight: float):
        self.denoiser, self.weight = denoiser, float(weight)
        self._terms: list[torch.Tensor] = []
        self.last_value = 0.0

    def wrapper(self, inner: Callable | None):
        def wrap(fn):
            run = inner(fn) if inner is not None else fn

            def call(x, t):
                out = run(x, t)
                with torch.no_grad(), adapters_disabled(self.denoiser):
                    base = fn(x, t)
                self._terms.append((out.float() - base.float()).pow(2).mean())
                return out
            return call
        return wrap

    def pop(self) -> torch.Tensor | None:
        if not self._terms:
            return None
        penalty = self.weight * torch.stack(self._terms).sum()
        self._terms = []
        self.last_value = float(penalty.detach())
        return penalty


@dataclass
class EarlyStopper:
    """Decides, round by round, whether the held-out curves say stop."""

    patience: int = 0
    min_delta: float = 0.0
    max_second_drop: float | None = None
    best: float | None = None
    rounds_without_rise: int = 0
    second_start: float | None = None
    reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, step: int, reward: float, second: float | None = None) -> str | None:
        """Feed one round; returns (and keeps) the reason to stop, or None."""
        self.history.append({"step": step, "reward": reward, "second_reward": second})
        if self.best is None or reward > self.best + self.min_delta:
            self.best, self.rounds_without_rise = reward, 0
        else:
            self.rounds_without_rise += 1
        if second is not None and self.second_start is None:
            self.second_start = second
        if self.reason is None and self.patience and self.rounds_without_rise >= self.patience:
            self.reason = (f"held-out reward has not risen for {self.rounds_without_rise} round(s) "
                           f"(best {self.best:.4g}; safeguards.early_stop_patience={self.patience})")
        if (self.reason is None and self.max_second_drop is not None and second is not None
                and self.second_start - second > self.max_second_drop):
            self.reason = (f"second reward fell from {self.second_start:.4g} to {second:.4g}, more than "
                           f"safeguards.second_reward_max_drop={self.max_second_drop:g}: the training reward is "
                           "likely being hacked")
        return self.reason


class Safeguards:
    """Everything above for one trainer: built from the config, called from the loop's hooks."""

    def __init__(self, cfg, train_prompts: list[str], val_prompts: list[str], device: torch.device):
        s = cfg.safeguards
        self.cfg = cfg
        self.second_reward = None
        if s.second_reward:
            from fastvader.config import RewardConfig
            from fastvader.rewards import build_reward

            options = {s.second_reward: dict(s.second_reward_options)} if s.second_reward_options else {}
            self.second_reward = build_reward(RewardConfig(name=s.second_reward, options=options)).freeze().to(device)
            if self.second_reward.needs_reference:
                from fastvader.config import ConfigError

                raise ConfigError(f"safeguards.second_reward: {s.second_reward} as configured scores a change against "
                                  "the base model's videos; a second reward scores the validation videos alone "
                                  "(for object_recolor, leave its anchor at frame)")
        self.stopper = EarlyStopper(s.early_stop_patience, s.early_stop_min_delta, s.second_reward_max_drop)
        self.regularizer: BaseModelRegularizer | None = None
        overlap = sorted(set(train_prompts) & set(val_prompts))
        if overlap and (s.early_stop_patience or s.second_reward):
            warnings.warn(f"fastvader: validation prompts {overlap[:3]} are also training prompts, so they are not "
                          "held out; give validation.prompts the run does not train on", stacklevel=2)

    def step_wrapper(self, denoiser: nn.Module, inner: Callable | None):
        """The sampler's grad-step wrapper, with the regulariser composed around ``inner``."""
        s = self.cfg.safeguards
        if s.regularizer == "denoiser" and s.regularizer_weight > 0:
            self.regularizer = BaseModelRegularizer(denoiser, s.regularizer_weight)
            return self.regularizer.wrapper(inner)
        return inner

    def penalty(self) -> torch.Tensor | None:
        return self.regularizer.pop() if self.regularizer is not None else None

    @property
    def stop_reason(self) -> str | None:
        return self.stopper.reason

    def after_validation(self, trainer, tag: str, videos: list[torch.Tensor], result: dict[str, Any]) -> None:
        """Score the second reward, write the round's frame grid, log both, feed early stopping."""
        from fastvader.io.media import sample_grid

        if self.second_reward is not None:
            prompts = trainer.val_prompts
            scores = [self.second_reward(v.to(trainer.device), prompts).float().cpu() for v in videos]
            result["second_reward"] = float(torch.stack(scores).mean())
        if self.cfg.safeguards.sample_grids:
            grid = trainer.run_dir / "samples" / f"{tag}_grid.png"
            if not grid.is_file():
                sample_grid(videos, trainer.val_prompts, trainer.cfg.validation.seeds, grid)
            result["grid"] = str(grid)
        loggers = getattr(trainer, "loggers", None)
        if loggers is not None:
            loggers.log_validation(trainer.step, tag, result, videos, trainer.cfg.video.fps)
        if tag != "after":  # the final round does not decide anything any more
            self.stopper.update(trainer.step, result["reward"], result.get("second_reward"))
            trainer.history["early_stop"] = dataclasses.asdict(self.stopper)

    def restore(self, history: dict[str, Any]) -> None:
        """Continue the early-stopping curves kept in a resumed run's history."""
        if history.get("early_stop"):
            self.stopper = EarlyStopper(**history["early_stop"])

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.stopper.history, "best_heldout_reward": self.stopper.best,
                "stopped_early": self.stopper.reason is not None, "stop_reason": self.stopper.reason,
                "second_reward": self.cfg.safeguards.second_reward,
                "regularizer": self.cfg.safeguards.regularizer,
                "regularizer_weight": self.cfg.safeguards.regularizer_weight}
