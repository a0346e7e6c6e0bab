"""``fastvader plan``: predict a step's peak GPU memory and list the settings that fit a budget."""
from __future__ import annotations

import json

from fastvader.cli.common import GPU_MEMORY_HELP, command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "plan", "predict peak GPU memory and list settings that fit a budget, fastest first")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help=f"{GPU_MEMORY_HELP}; default: memory.gpu_memory, else 24GiB")
    p.add_argument("--no-cache", action="store_true", help="re-measure instead of reading the measurement cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.memory import reference_models  # noqa: F401  (registers modelscope_arch, aesthetic_arch)
    from fastvader.memory.planner import make_plan, measure

    cfg = load(args, need_prompts=False)
    budget = cfg.memory.gpu_memory or "24GiB"
    plan = make_plan(cfg, budget, measure(cfg, use_cache=not args.no_cache))
    if args.json:
        print(json.dumps({"budget": plan.budget, "current": {"peak": plan.current.peak, **plan.current.parts},
                          "fits": [{"peak": p.peak, "relative_time": p.relative_time / plan.current.relative_time,
                                    "overrides": p.setting.overrides(), "host_bytes": p.host_bytes,
                                    "added_seconds": p.added_seconds} for p in plan.ranked],
                          "notes": plan.notes}, indent=2))
    else:
        print(plan.table())
    return 0 if plan.ranked else 1
