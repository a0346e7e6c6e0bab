""""Did it learn?" signals: per-step numbers that show whether training changes anything, and an
end-of-run summary that warns when they sit near zero.

- ``lora_norm``: the norm of all LoRA parameters;
- ``lora_change``: ||theta - theta_start|| / max(||theta_start||, 1e-12) (relative);
- ``lora_delta``: the norm of the update the adapters actually add to the base weights,
  sum over layers of ||scale * B @ A|| (0 at a standard init, since B starts at zero);
- ``grad_norm``: from the step (before clipping);
- ``reward_change``: mean reward over the last ``window`` steps minus over the first ``window``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn


def lora_delta_norm(denoiser: nn.Module) -> float:
    """sqrt(sum over LoRA layers of ||scale * B @ A||_F^2): the size of what the adapters add."""
    from peft.tuners.lora import LoraLayer

    total = 0.0
    for module in denoiser.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight.detach().float()
            b = module.lora_B[name].weight.detach().float()
            scale = float(module.scaling[name])
            total += float((scale * (b.flatten(1) @ a.flatten(1))).pow(2).sum())
    return math.sqrt(total)


class LearnMonitor:
    """Snapshots the LoRA at the start; ``observe`` returns the signals for one step."""

    def __init__(self, denoiser: nn.Module, params: Sequence[torch.Tensor], guards_cfg,
                 store: Callable[[], dict] | None = None):
        self.denoiser = denoiser
        self.params = list(params)
        self.cfg = guards_cfg
        self.start = [p.detach().float().clone() for p in self.params]
        self.start_norm = self._norm(self.start)
        # the per-step history lives in ``store()`` (the trainer's checkpointed history), so a
        # resumed run compares its reward against the same first steps as an uninterrupted one
        own: dict = {}
        self._store = store or (lambda: own)
        self.last: dict[str, float] = {}

    @property
    def rewards(self) -> list[float]:
        return self._store().setdefault("rewards", [])

    @property
    def grad_norms(self) -> list[float]:
        return self._store().setdefault("grad_norms", [])

    @staticmethod
    def _norm(tensors) -> float:
        return math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors))

    def observe(self, reward: float, grad_norm: float, skipped: bool) -> dict[str, float]:
        if not skipped:
            self.rewards.append(float(reward))
            self.grad_norms.append(float(grad_norm))
        change = math.sqrt(sum(float((p.detach().float() - s).pow(2).sum()) for p, s in zip(self.params, self.start)))
        self.last = {"lora_norm": self._norm(self.params),
                     "lora_change": change / max(self.start_norm, 1e-12),
                     "lora_delta": lora_delta_norm(self.denoiser),
                     "reward_change": self.reward_change()}
        return dict(self.last)

    def reward_change(self) -> float:
        if len(self.rewards) < 2:
            return 0.0
        w = max(1, min(self.cfg.reward_window, len(self.rewards) // 2))
        first, last = self.rewards[:w], self.rewards[-w:]
        return sum(last) / len(last) - sum(first) / len(first)

    def summary(self) -> dict[str, Any]:
        """The signals at the end of the run, and a warning for each that sits near zero."""
        if not self.last:
            self.observe(float("nan"), float("nan"), skipped=True)
        cfg = self.cfg
        mean_grad = sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else 0.0
        out: dict[str, Any] = {**self.last, "mean_grad_norm": mean_grad, "steps_observed": len(self.rewards),
                               "warnings": []}
        warn = out["warnings"].append
        if not self.grad_norms:
            warn("no step completed: there is nothing to judge (every step was skipped)")
            return out
        if mean_grad < cfg.min_grad_norm:
            warn(f"gradient norm near zero (mean {mean_grad:.3g} < guards.min_grad_norm={cfg.min_grad_norm:g}): "
                 "no gradient reaches the LoRA; look for a detached latent, a frozen path, or lora.target_modules "
                 "outside the gradient path")
        if out["lora_change"] < cfg.min_lora_change:
            warn(f"LoRA weights barely moved (relative change {out['lora_change']:.3g} < guards.min_lora_change="
                 f"{cfg.min_lora_change:g}): raise optim.lr or lora.alpha, or check the gradient path")
        if len(self.rewards) >= 2 and abs(out["reward_change"]) < cfg.min_reward_change:
            warn(f"training reward did not change (last minus first steps {out['reward_change']:.3g}, "
                 f"|change| < guards.min_reward_change={cfg.min_reward_change:g}): lora.alpha too small, lr too "
                 "low, or too few steps")
        return out
