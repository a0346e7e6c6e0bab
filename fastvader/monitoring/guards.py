"""Numerical guards: a step whose loss, reward or gradient norm is NaN/Inf is skipped (no
optimizer update, no scheduler tick) and counted; a run stuck on such steps stops with an error
that says what to change; weights holding NaN/Inf are never written to disk; fp16 on a model
family that ships in bf16 is refused unless forced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

#: families whose released weights are bf16: their activations overflow fp16's range
BF16_FAMILIES = ("wan", "cogvideox", "opensora")


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf values it cannot recover from, or was about to save them."""


def is_finite(value: Any) -> bool:
    """True for a finite number or a tensor whose every element is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


def fp16_risk(backbone_name: str, precision: str, dtype: str) -> str | None:
    """Why fp16 autocast (``precision``) or fp16 weights (``dtype``) would overflow this
    backbone's activations, or None. Config validation refuses the risk unless
    ``guards.allow_fp16`` forces it."""
    uses_fp16 = [f"{where}=fp16" for where, value in (("train.precision", precision), ("backbone.dtype", dtype))
                 if value == "fp16"]
    if not uses_fp16:
        return None
    family = backbone_name
    try:
        from fastvader.backbones import backbone_class

        family = backbone_class(backbone_name).family
    except (ValueError, ImportError):
        pass
    key = "".join(ch for ch in str(family).lower() if ch.isalnum())
    if not any(key.startswith(f) for f in BF16_FAMILIES):
        return None
    return (f"{' and '.join(uses_fp16)} on backbone {backbone_name!r}: this family ships in bf16, and fp16's "
            "smaller range overflows its activations (NaN losses). Use train.precision=bf16 (and "
            "backbone.dtype=bf16 or auto)")


def check_finite_state(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, Any]], what: str) -> None:
    """Raise NonFiniteError naming the first tensor that holds NaN/Inf (nested dicts and lists of
    an optimizer state are searched too). Called before any weights are written."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, value in items:
        bad = first_nonfinite(value, str(name))
        if bad is not None:
            raise NonFiniteError(f"refusing to write {what}: {bad} holds NaN/Inf. The previous file (if any) "
                                 "is kept; see metrics.jsonl for the step where the values broke")


def first_nonfinite(value: Any, name: str) -> str | None:
    """The dotted name of the first floating-point tensor or float under ``value`` that holds
    NaN/Inf, or None."""
    if isinstance(value, torch.Tensor):
        return None if (not value.is_floating_point() or is_finite(value)) else name
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = first_nonfinite(v, f"{name}.{k}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = first_nonfinite(v, f"{name}[{i}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return name
    return None


@dataclass
class NumericalGuard:
    """Counts skipped steps and stops the run after ``max_bad_steps`` in a row.

    Under fp16 a GradScaler overflow (finite loss, Inf gradients) is routine: the scaler lowers
    its scale and the step is skipped. Such steps count against the limit only once the scale has
    fallen below 1, i.e. once the gradients overflow even unscaled."""

    max_bad_steps: int
    precision: str = "fp32"
    bad_steps: int = 0
    consecutive: int = 0
    overflow_steps: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_reason: str = ""

    def classify(self, loss_ok: bool, grad_ok: bool, scaler: torch.amp.GradScaler | None) -> str | None:
        """The reason a step must be skipped, or None. Call after the backward pass."""
        if not loss_ok:
            return "non-finite loss or reward"
        if not grad_ok:
            if scaler is not None and scaler.is_enabled():
                return "fp16 gradient overflow"
            return "non-finite gradient norm"
        return None

    def record(self, reason: str | None, scaler: torch.amp.GradScaler | None = None) -> None:
        if reason is None:
            self.consecutive = 0
            return
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.last_reason = reason
        if reason == "fp16 gradient overflow":
            self.overflow_steps += 1
            if scaler is not None and scaler.get_scale() >= 1.0:
                return  # the scaler is still searching for a scale that fits: routine
        self.bad_steps += 1
        self.consecutive += 1

    def raise_if_stuck(self, step: int) -> None:
        if self.consecutive < self.max_bad_steps:
            return
        advice = ["lower optim.lr (or keep optim.max_grad_norm > 0 to clip)",
                  "lower sampler.guidance_scale (large guidance amplifies the reward's gradient)"]
        if self.precision == "fp16":
            advice.insert(0, "use train.precision=bf16 or fp32 (fp16 overflows)")
        elif self.precision in ("bf16", "auto"):
            advice.insert(0, "try train.precision=fp32 to see whether precision is the cause")
        raise NonFiniteError(
            f"{self.consecutive} training steps in a row (up to step {step}) were skipped: {self.last_reason}. "
            f"Nothing was saved from them. To fix: {'; '.join(advice)}. "
            f"(guards.max_bad_steps={self.max_bad_steps} sets how many in a row stop the run.)")

    def summary(self) -> dict[str, Any]:
        return {"skipped_steps": sum(self.reasons.values()), "bad_steps": self.bad_steps,
                "fp16_overflow_steps": self.overflow_steps, "reasons": dict(self.reasons),
                "max_bad_steps": self.max_bad_steps}
