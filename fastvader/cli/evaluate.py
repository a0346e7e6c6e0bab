"""``fastvader eval``: score the validation prompts with the configured reward."""
from __future__ import annotations

import json

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "eval", "score the validation prompts with the configured reward")
    p.add_argument("--lora", default=None, help="LoRA safetensors to evaluate")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.inference import VideoPipeline
    from fastvader.training.prompts import validation_prompts

    cfg = load(args)
    result = VideoPipeline(cfg, lora=args.lora).evaluate(validation_prompts(cfg), list(cfg.validation.seeds))
    print(json.dumps(result, indent=2))
    return 0
