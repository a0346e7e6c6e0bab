"""``fastvader profile``: a few steps of a config, measured phase by phase."""
from __future__ import annotations

import json
from pathlib import Path

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "profile", "run a few steps of a config and show time and peak memory per phase, the "
                                       "planner's prediction and which speed and memory settings engaged")
    p.add_argument("--steps", type=int, default=2, help="measured steps")
    p.add_argument("--warmup", type=int, default=2,
                   help="steps run before measuring (the self-check's eager step; the step that compiles and "
                        "records CUDA graphs)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where profile.json, memory_timeline.png and (CUDA) memory_snapshot.pickle go "
                        "(default: the run folder's profile/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.config import ConfigError
    from fastvader.speed.profile import plot_memory, profile, table
    from fastvader.training.trainer import Trainer

    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps={args.steps} --warmup={args.warmup}: measure at least one step, warm up zero or more")
    cfg = load(args)
    out = Path(args.out) if args.out else cfg.run_dir / "profile"
    trainer = Trainer(cfg)
    try:
        report = profile(trainer, steps=args.steps, warmup=args.warmup, out_dir=out)
    finally:
        trainer.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
    plot_memory(report, out / "memory_timeline.png")
    print(json.dumps(report, indent=1, default=str) if args.json else table(report))
    print(f"fastvader: wrote {out / 'profile.json'} and {out / 'memory_timeline.png'}")
    return 0
