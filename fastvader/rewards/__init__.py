"""Reward registry. Built-in rewards register themselves on import; ``available_rewards()``
lists them and ``build_reward(cfg)`` builds what a RewardConfig names."""
from __future__ import annotations

import importlib

from fastvader.rewards._hf import PretrainedReward
from fastvader.rewards.base import REWARDS, Reward, WeightedSum, build_reward_from_spec, register_reward

# Modules whose import registers rewards. Real-model rewards import transformers lazily inside
# their constructors, so listing them here stays cheap.
_BUILTIN_MODULES = [
    "fastvader.rewards.toy",
    "fastvader.rewards.aesthetic",
    "fastvader.rewards.hps",
    "fastvader.rewards.pickscore",
    "fastvader.rewards.clip_score",
    "fastvader.rewards.viclip",
    "fastvader.rewards.action",
    "fastvader.rewards.objectness",
    "fastvader.rewards.vjepa",
    "fastvader.rewards.image_consistency",
]

# Named combinations usable as reward.name in a config.
PRESETS: dict[str, dict[str, float]] = {
    # VADER's aesthetic + HPSv2 combination
    "aesthetic_hps": {"aesthetic": 1.0, "hpsv2": 15.0},
}


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(REWARDS) + sorted(PRESETS)


def reward_class(name: str) -> type[Reward]:
    """The registered class of reward ``name`` (built-ins are loaded first)."""
    _load_builtins()
    if name not in REWARDS:
        raise ValueError(f"reward {name!r} does not exist; choose from {available_rewards()}")
    return REWARDS[name]


def describe_rewards() -> list[dict]:
    """``describe()`` of every registered reward, for ``fastvader models`` (and its --json)."""
    _load_builtins()
    return [REWARDS[name].describe() for name in sorted(REWARDS)]


def expand_terms(terms: dict[str, float]) -> dict[str, float]:
    """Replace preset names by their members, scaled by the preset's weight:
    {aesthetic_hps: 2.0, viclip: 1.0} -> {aesthetic: 2.0, hpsv2: 30.0, viclip: 1.0}."""
    out: dict[str, float] = {}
    for name, weight in terms.items():
        members = PRESETS.get(name, {name: 1.0})
        for member, w in members.items():
            out[member] = out.get(member, 0.0) + float(weight) * w
    return out


def _terms(cfg) -> dict[str, float]:
    """A RewardConfig's ``terms`` ({name: weight}, presets expanded) or, when empty, ``{name: 1}``."""
    terms = {str(k): float(v) for k, v in cfg.terms.items()} if getattr(cfg, "terms", None) else {str(cfg.name): 1.0}
    return expand_terms(terms)


def build_reward(cfg, *, progress: bool = True) -> Reward:
    """Build from a RewardConfig: ``cfg.terms`` ({name: weight}, presets allowed) or, when it is
    empty, ``cfg.name``; ``cfg.options`` ({reward: {option: value}}) go to the constructors. A
    hub id that is neither cached nor reachable fails at once, naming its option (fastvader.hub)."""
    from fastvader.console import stage
    from fastvader.hub import hub_or_cache

    _load_builtins()
    terms, options = _terms(cfg), dict(getattr(cfg, "options", None) or {})
    hub = {f"reward.options.{name}.pretrained": (options.get(name) or {}).get("pretrained") or REWARDS[name].default_pretrained
           for name in terms if issubclass(REWARDS.get(name, Reward), PretrainedReward)
           and not (options.get(name) or {}).get("random_init")}
    with stage(f"loading reward {'+'.join(terms)}", enabled=progress and bool(hub)), hub_or_cache(hub):
        return build_reward_from_spec(terms, options)


def build_reward_architecture(cfg) -> Reward:
    """What ``build_reward(cfg)`` builds, with random weights and nothing read or downloaded but
    fastvader's packaged configs (``PretrainedReward.architecture_options``): what the memory
    planner measures on the meta device. Weightless rewards are built as configured."""
    _load_builtins()
    terms = _terms(cfg)
    options = dict(getattr(cfg, "options", None) or {})
    for name in terms:
        cls = REWARDS.get(name)
        if cls is not None and issubclass(cls, PretrainedReward):
            options[name] = cls.architecture_options(dict(options.get(name) or {}))
    return build_reward_from_spec(terms, options)


__all__ = ["Reward", "WeightedSum", "register_reward", "available_rewards", "build_reward", "build_reward_architecture",
           "expand_terms", "describe_rewards", "reward_class", "REWARDS", "PRESETS"]
