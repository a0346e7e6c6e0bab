"""``fastvader sample``: generate videos, optionally with a trained LoRA."""
from __future__ import annotations

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "sample", "generate videos (optionally with a trained LoRA)")
    p.add_argument("--lora", default=None, help="LoRA safetensors written by train (runs/<name>/lora.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); default: validation prompts")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable; default 0)")
    p.add_argument("--out", default="samples", help="output folder for mp4/gif files and a frame grid")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.inference import VideoPipeline, write_samples
    from fastvader.training.prompts import validation_prompts

    cfg = load(args)
    prompts = args.prompt or validation_prompts(cfg)
    seeds = args.seed or [0]
    pipeline = VideoPipeline(cfg, lora=args.lora, with_reward=False)
    videos = [pipeline.sample(prompts, seed).cpu() for seed in seeds]
    files = write_samples(videos, prompts, seeds, args.out, cfg.video.fps)
    print("wrote", *[str(f) for f in files])
    return 0
