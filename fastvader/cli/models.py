"""``fastvader models``: the catalogue of every backbone and reward with its defaults and
parameter counts (the real architectures from the configs packaged with fastvader, built on the
meta device: no weights, no download)."""
from __future__ import annotations

import json
from typing import Any

from fastvader.cli.common import command_parser


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
    from fastvader.backbones import available_backbones, backbone_class
    from fastvader.rewards import PRESETS, REWARDS, available_rewards

    available_rewards()  # registers the built-ins
    backbones = [_describe(backbone_class(n), n) for n in available_backbones()]
    rewards = [_describe(cls, n) for n, cls in sorted(REWARDS.items())]
    counts = {entry["name"]: entry.get("params") for entry in rewards}
    rewards += [_describe_preset(n, terms, counts) for n, terms in sorted(PRESETS.items())]
    return {"backbones": backbones, "rewards": rewards}


def _describe_preset(name: str, terms: dict[str, float], counts: dict[str, Any]) -> dict[str, Any]:
    """A preset's members, and its parameter count: theirs together (None if one is unknown)."""
    members = [counts.get(member) for member in terms]
    total = sum(members) if all(isinstance(n, int) for n in members) else None
    return {"name": name, "kind": "preset", "terms": terms, "params": total}


def add_parser(sub) -> None:
    p = command_parser(sub, "models", "list backbones and rewards with defaults and parameter counts", config=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    data = catalog()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for kind in ("backbones", "rewards"):
        print(f"{kind}:")
        for entry in data[kind]:
            print(_format_entry(entry))
    return 0


def _format_params(params: Any) -> str:
    if isinstance(params, dict):
        return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in params.items())
    return f"{params:,}" if isinstance(params, int) else str(params)


def _format_entry(entry: dict[str, Any]) -> str:
    kind = entry.get("kind") or entry.get("prediction_type") or ""
    lines = [f"  {entry['name']:<20} {kind:<10} params: {_format_params(entry.get('params'))}"]
    variants = entry.get("params_by_variant") or {}
    for variant, params in variants.items() if len(variants) > 1 else ():  # e.g. CogVideoX 2b / 5b
        default = " (default)" if variant == entry.get("variant") else ""
        lines.append(f"  {'':<20} options.variant {variant}{default}: {_format_params(params)}")
    if entry.get("weights"):
        lines.append(f"  {'':<20} weights: {entry['weights']}")
    if entry.get("defaults"):
        lines.append(f"  {'':<20} defaults: {entry['defaults']}")
    return "\n".join(lines)
