"""``fastvader train``: align a video model with a reward."""
from __future__ import annotations

import json

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "train", "align a video model with a reward")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (from its newest intact checkpoint and its own config.yaml, "
                        "unless --config is given), or from a chosen checkpoint: RUN_DIR/checkpoints/step_N")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run folder that holds one: deletes everything in it first")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory budget such as 24GiB: apply the fastest memory settings the planner predicts to fit")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.training.run_folder import ResumePoint
    from fastvader.training.trainer import train

    if args.resume and args.config is None:
        cfg = load(args, ResumePoint.parse(args.resume).config_path())
    else:
        cfg = load(args)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    shown = ("run", "steps", "status", "reward_before", "reward_after", "wall_time_s", "learn")
    print(json.dumps({k: summary[k] for k in shown if k in summary}, indent=2))
    if summary.get("safeguards", {}).get("stop_reason"):
        print(f"stopped early: {summary['safeguards']['stop_reason']}")
    return 0
