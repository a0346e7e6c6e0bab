"""``fastvader eval``: score the validation prompts with the configured reward."""
from __future__ import annotations

import json

from fastvader.cli.common import command_parser, load


def add_parser(sub) -> None:
    p = command_parser(sub, "eval", "score the validation prompts with the configured reward")
    p.add_argument("--lora", default=None, help="LoRA safetensors to evaluate")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.cli.sample import load_trained_lora
    from fastvader.training.trainer import Trainer

    trainer = Trainer(load(args))
    if args.lora:
        load_trained_lora(trainer, args.lora)
    result = trainer.validate("eval")
    print(json.dumps(result, indent=2))
    return 0
