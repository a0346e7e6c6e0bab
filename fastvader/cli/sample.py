"""``fastvader sample``: generate videos, optionally with a trained LoRA."""
from __future__ import annotations

import time
from pathlib import Path

from fastvader.cli.common import command_parser, load

LORA_HELP = "a LoRA file: a run's lora.safetensors or a kohya/ComfyUI/diffusers export (its metadata shapes the adapters)"


def add_parser(sub) -> None:
    p = command_parser(sub, "sample", "generate videos (optionally with a trained LoRA)")
    p.add_argument("--lora", default=None, help=LORA_HELP)
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); default: validation prompts")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable; default 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder for mp4/gif files and a labelled frame grid (default: a new "
                        "sample-<date>-<time> folder under train.output_dir)")
    p.set_defaults(func=run)


def default_out(output_dir: str, what: str) -> Path:
    """A new folder under the runs folder, named by the time: nothing earlier is overwritten."""
    return Path(output_dir) / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args) -> int:
    from fastvader.console import progress
    from fastvader.inference import VideoPipeline, write_samples
    from fastvader.training.prompts import validation_prompts

    cfg = load(args)
    prompts = args.prompt or validation_prompts(cfg)
    seeds = args.seed or [0]
    out = Path(args.out) if args.out else default_out(cfg.train.output_dir, "sample")
    pipeline = VideoPipeline(cfg, lora=args.lora, with_reward=False)
    videos = [pipeline.sample(prompts, seed).cpu()
              for seed in progress(seeds, f"sampling {len(prompts)} prompt(s) a seed", enabled=cfg.train.progress,
                                   unit="seed")]
    files = write_samples(videos, prompts, seeds, out, cfg.video.fps)
    print(f"wrote {len(files)} video files and grid.png to {out}")
    return 0
