"""Reward registry. Built-in rewards register themselves on import; ``available_rewards()``
lists them and ``build_reward(cfg)`` builds what a RewardConfig names."""
from __future__ import annotations

import importlib

from .base import REWARDS, Reward, WeightedSum, build_reward_from_spec, register_reward

# Modules whose import registers rewards. Real-model rewards import transformers lazily inside
# their constructors, so listing them here stays cheap.
_BUILTIN_MODULES = ["fastvader.rewards.toy"]

# Named combinations usable as reward.name in a config.
PRESETS: dict[str, dict[str, float]] = {}


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(REWARDS) + sorted(PRESETS)


def build_reward(cfg) -> Reward:
    """Build from a RewardConfig: ``cfg.terms`` ({name: weight}, or ``cfg.name`` alone) and
    ``cfg.options``."""
    _load_builtins()
    terms = {str(k): float(v) for k, v in cfg.terms.items()} if cfg.terms else {str(cfg.name): 1.0}
    if len(terms) == 1 and next(iter(terms)) in PRESETS:
        (preset, scale), = terms.items()
        terms = {k: w * scale for k, w in PRESETS[preset].items()}
    return build_reward_from_spec(terms, cfg.options)


__all__ = ["Reward", "WeightedSum", "register_reward", "available_rewards", "build_reward", "REWARDS", "PRESETS"]
