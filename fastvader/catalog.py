"""The catalogue behind ``fastvader models``: every backbone and reward with its defaults and
parameter counts (from the real configurations, built on the meta device)."""
from __future__ import annotations

from typing import Any


def _describe(cls, name: str) -> dict[str, Any]:
    describe = getattr(cls, "describe", None)
    if describe is None:
        return {"name": name, "defaults": getattr(cls, "defaults", {}), "params": None}
    try:
        entry = dict(describe())
    except Exception as err:  # one broken entry must not hide the others
        entry = {"error": f"{type(err).__name__}: {err}"}
    entry.setdefault("name", name)
    return entry


def catalog() -> dict[str, list[dict[str, Any]]]:
    from .backbones import available_backbones, backbone_class
    from .rewards import PRESETS, REWARDS, available_rewards

    available_rewards()  # registers the built-ins
    backbones = [_describe(backbone_class(n), n) for n in available_backbones()]
    rewards = [_describe(cls, n) for n, cls in sorted(REWARDS.items())]
    rewards += [{"name": n, "kind": "preset", "terms": terms} for n, terms in sorted(PRESETS.items())]
    return {"backbones": backbones, "rewards": rewards}
