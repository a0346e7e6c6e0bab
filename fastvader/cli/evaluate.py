"""``fastvader eval``: score the validation prompts with the configured reward."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastvader.cli.common import command_parser, load
from fastvader.cli.sample import LORA_HELP


def add_parser(sub) -> None:
    p = command_parser(sub, "eval", "score the validation prompts with the configured reward")
    p.add_argument("--lora", default=None, help=LORA_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON (nothing else on stdout)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write eval.json and a labelled frame grid of the scored videos there "
                        "(nothing is written without it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.inference import VideoPipeline
    from fastvader.io.checkpoint import write_json
    from fastvader.io.media import sample_grid
    from fastvader.training.prompts import validation_prompts

    cfg = load(args)
    prompts, seeds = validation_prompts(cfg), list(cfg.validation.seeds)
    result, videos = VideoPipeline(cfg, lora=args.lora).score(prompts, seeds)
    if args.out:
        out = Path(args.out)
        write_json(out / "eval.json", result)
        sample_grid(videos, prompts, seeds, out / "grid.png")
    print(json.dumps(result, indent=2) if args.json else readable(result, len(seeds)))
    if args.out and not args.json:
        print(f"wrote {Path(args.out) / 'eval.json'} and {Path(args.out) / 'grid.png'}")
    return 0


def readable(result: dict[str, Any], seeds: int) -> str:
    lora = result["lora"] or "none (the base model)"
    trained = f", trained {result['step']} steps" if result.get("step") is not None and result["lora"] else ""
    lines = [f"reward {result['reward']:.4f}: mean over {len(result['per_prompt'])} prompt(s) x {seeds} seed(s); "
             f"LoRA {lora}{trained}"]
    width = max(len(p) for p in result["per_prompt"])
    lines += [f"  {prompt:<{width}}  {value:.4f}" for prompt, value in result["per_prompt"].items()]
    return "\n".join(lines)
