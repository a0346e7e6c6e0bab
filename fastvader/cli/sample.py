"""``fastvader sample``: generate videos, optionally with a trained LoRA."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "sample", "generate videos (optionally with a trained LoRA)")
    p.add_argument("--lora", default=None, help="LoRA safetensors written by train (runs/<name>/lora.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); default: validation prompts")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable; default 0)")
    p.add_argument("--out", default="samples", help="output folder for mp4/gif files and a frame grid")
    p.set_defaults(func=run)


def load_trained_lora(trainer, path: str) -> None:
    """Load a LoRA file written by ``train`` into a trainer's (already injected) adapters."""
    from peft.utils import set_peft_model_state_dict

    from fastvader.lora import read_lora

    state, _ = read_lora(path)
    result = set_peft_model_state_dict(trainer.backbone.denoiser, {k: v.to(trainer.device) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path} does not match this model's LoRA layout (e.g. {result.unexpected_keys[:2]}); "
                         "use the same backbone and lora settings it was trained with")


def run(args) -> int:
    from fastvader.io.media import frame_grid, write_video
    from fastvader.training.trainer import Trainer

    cfg = load(args)
    prompts = args.prompt or list(cfg.validation.prompts) or None
    if prompts:
        cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, prompts=prompts))
    trainer = Trainer(cfg)
    if args.lora:
        load_trained_lora(trainer, args.lora)
    out = Path(args.out)
    videos = []
    for seed in args.seed or [0]:
        batch = trainer.sample_videos(trainer.val_prompts, seed)
        for i, prompt in enumerate(trainer.val_prompts):
            files = write_video(batch[i], out / f"seed{seed}_{i:02d}_{'_'.join(prompt.split())[:40]}", cfg.video.fps)
            print("wrote", *[str(f) for f in files])
            videos.append(batch[i])
    frame_grid(videos, out / "grid.png")
    return 0
