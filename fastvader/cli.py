"""The ``fastvader`` command: train, sample, eval, models, env (and more as they land).

Every config field can be overridden with ``--set section.key=value``; ``fastvader train --help``
lists every field with its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig, load_config
from .guards import NonFiniteError
from .selfcheck import SelfCheckError


def config_reference() -> str:
    """Every config field with its default, for --help."""
    lines = ["config fields (override with --set section.key=value):"]
    for section in dataclasses.fields(TrainConfig):
        obj = getattr(TrainConfig(), section.name)
        for f in dataclasses.fields(obj):
            lines.append(f"  {section.name}.{f.name} = {getattr(obj, f.name)!r}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML config (sections as in the reference below); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--device", default=None, help="shorthand for --set train.device=DEVICE (auto, cpu, cuda)")


def _load(args) -> TrainConfig:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "gpu_memory", None):
        overrides.append(f"memory.gpu_memory={args.gpu_memory}")
    return load_config(args.config, overrides)


def cmd_plan(args) -> int:
    from .memory import reference_models  # noqa: F401  (registers modelscope_arch, aesthetic_arch)
    from .memory.planner import make_plan, measure

    cfg = _load(args)
    budget = args.gpu_memory or cfg.memory.gpu_memory or "24GiB"
    plan = make_plan(cfg, budget, measure(cfg, use_cache=not args.no_cache))
    if args.json:
        print(json.dumps({"budget": plan.budget, "current": {"peak": plan.current.peak, **plan.current.parts},
                          "fits": [{"peak": p.peak, "relative_time": p.relative_time / plan.current.relative_time,
                                    "overrides": p.setting.overrides()} for p in plan.ranked]}, indent=2))
    else:
        print(plan.table())
    return 0 if plan.ranked else 1


def _load_trained_lora(trainer, path: str) -> None:
    """Load a LoRA file written by ``train`` into a trainer's (already injected) adapters."""
    from peft.utils import set_peft_model_state_dict

    from .lora import read_lora

    state, _ = read_lora(path)
    result = set_peft_model_state_dict(trainer.backbone.denoiser, {k: v.to(trainer.device) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path} does not match this model's LoRA layout (e.g. {result.unexpected_keys[:2]}); "
                         "use the same backbone and lora settings it was trained with")


def cmd_train(args) -> int:
    from .train_loop import train

    cfg = _load(args)
    if args.resume:
        resumed = Path(args.resume)
        saved = resumed / "config.yaml"
        if args.config is None and saved.is_file():
            cfg = load_config(saved, args.overrides)
    summary = train(cfg, resume=args.resume)
    shown = ("run", "steps", "status", "reward_before", "reward_after", "wall_time_s", "learn")
    print(json.dumps({k: summary[k] for k in shown if k in summary}, indent=2))
    if summary.get("safeguards", {}).get("stop_reason"):
        print(f"stopped early: {summary['safeguards']['stop_reason']}")
    return 0


def cmd_sample(args) -> int:
    from .media import frame_grid, write_video
    from .train_loop import Trainer

    cfg = _load(args)
    prompts = args.prompt or list(cfg.validation.prompts) or None
    if prompts:
        cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, prompts=prompts))
    trainer = Trainer(cfg)
    if args.lora:
        _load_trained_lora(trainer, args.lora)
    out = Path(args.out)
    videos = []
    for seed in args.seed:
        batch = trainer.sample_videos(trainer.val_prompts, seed)
        for i, prompt in enumerate(trainer.val_prompts):
            files = write_video(batch[i], out / f"seed{seed}_{i:02d}_{'_'.join(prompt.split())[:40]}", cfg.video.fps)
            print("wrote", *[str(f) for f in files])
            videos.append(batch[i])
    frame_grid(videos, out / "grid.png")
    return 0


def cmd_eval(args) -> int:
    from .train_loop import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg)
    if args.lora:
        _load_trained_lora(trainer, args.lora)
    result = trainer.validate("eval")
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args) -> int:
    from .export import export_lora

    out = export_lora(args.source, args.format, args.out, prefix=args.prefix)
    print(f"wrote {out} ({args.format} layout)")
    return 0


def cmd_env(args) -> int:
    from .env import environment_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


def cmd_models(args) -> int:
    from .catalog import catalog

    data = catalog()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for kind in ("backbones", "rewards"):
        print(f"{kind}:")
        for entry in data[kind]:
            params = entry.get("params")
            if isinstance(params, dict):
                params = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in params.items())
            elif isinstance(params, int):
                params = f"{params:,}"
            kind = entry.get("kind") or entry.get("prediction_type") or ""
            print(f"  {entry['name']:<20} {kind:<10} params: {params}")
            if entry.get("weights"):
                print(f"  {'':<20} weights: {entry['weights']}")
            if entry.get("defaults"):
                print(f"  {'':<20} defaults: {entry['defaults']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvader", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="align a video model with a reward", formatter_class=_HelpFormatter,
                       epilog=config_reference())
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its latest checkpoint")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory budget such as 24GiB: apply the fastest memory settings the planner predicts to fit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="predict peak GPU memory and list settings that fit a budget, fastest first",
                       formatter_class=_HelpFormatter, epilog=config_reference())
    _add_config_args(p)
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="budget such as 24GiB (default: "
                   "memory.gpu_memory, else 24GiB)")
    p.add_argument("--no-cache", action="store_true", help="re-measure instead of reading the measurement cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="generate videos (optionally with a trained LoRA)",
                       formatter_class=_HelpFormatter, epilog=config_reference())
    _add_config_args(p)
    p.add_argument("--lora", default=None, help="LoRA safetensors written by train (runs/<name>/lora.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); default: validation prompts")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable)")
    p.add_argument("--out", default="samples", help="output folder for mp4/gif files and a frame grid")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score the validation prompts with the configured reward",
                       formatter_class=_HelpFormatter, epilog=config_reference())
    _add_config_args(p)
    p.add_argument("--lora", default=None, help="LoRA safetensors to evaluate")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="convert a trained LoRA to the diffusers, ComfyUI or kohya layout",
                       formatter_class=_HelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_FILE", help="a run directory (its lora.safetensors) or a LoRA file")
    p.add_argument("--format", required=True, choices=["diffusers", "comfyui", "kohya"], help="target layout")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the .safetensors file")
    p.add_argument("--prefix", default="unet", choices=["unet", "transformer"],
                   help="diffusers key prefix: unet (UNet pipelines) or transformer (Wan, CogVideoX)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("env", help="versions, devices and active kernel paths (for bug reports)",
                       formatter_class=_HelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("models", help="list backbones and rewards with defaults and parameter counts",
                       formatter_class=_HelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "seed", 0) is None:
        args.seed = [0]
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"fastvader: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"fastvader: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, SelfCheckError) as err:  # a guard stopped the run: say why, no traceback
        print(f"fastvader: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
