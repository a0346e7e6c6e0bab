"""``fastvader train``: align a video model with a reward."""
from __future__ import annotations

import json
from pathlib import Path

from fastvader.cli.common import command_parser, load
from fastvader.config import load_config


def add_parser(sub) -> None:
    p = command_parser(sub, "train", "align a video model with a reward")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its latest checkpoint")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory budget such as 24GiB: apply the fastest memory settings the planner predicts to fit")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.training.trainer import train

    cfg = load(args)
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if args.config is None and saved.is_file():
            cfg = load_config(saved, args.overrides)
    summary = train(cfg, resume=args.resume)
    shown = ("run", "steps", "status", "reward_before", "reward_after", "wall_time_s", "learn")
    print(json.dumps({k: summary[k] for k in shown if k in summary}, indent=2))
    if summary.get("safeguards", {}).get("stop_reason"):
        print(f"stopped early: {summary['safeguards']['stop_reason']}")
    return 0
