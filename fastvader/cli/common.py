"""What every config-taking command shares: --config/--set/--device, loading, and the field
reference printed under --help."""
from __future__ import annotations

import argparse
import dataclasses
import json

from fastvader.config import PromptConfig, TrainConfig, load_config

DEBUG_HELP = "show the full traceback of an error instead of one line (or set FASTVADER_DEBUG=1)"
GPU_MEMORY_HELP = "memory budget such as 24GiB, 24G or 24 (a bare number means GiB)"
#: what ``plan`` scores when a config names no training prompts: the memory a step needs does not
#: depend on the words (rewards that read the prompt, such as ``action``, get a plausible one)
PLANNING_PROMPT = "a person walking"


def config_reference() -> str:
    """Every config field with its default, for --help."""
    lines = ["config fields (override with --set section.key=value):"]
    for section in dataclasses.fields(TrainConfig):
        obj = getattr(TrainConfig(), section.name)
        for f in dataclasses.fields(obj):
            lines.append(f"  {section.name}.{f.name} = {getattr(obj, f.name)!r}")
    return "\n".join(lines)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML config (sections as in the reference below); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--device", default=None, help="shorthand for --set train.device=DEVICE (auto, cpu, cuda)")


def command_parser(sub, name: str, help: str, *, config: bool = True) -> argparse.ArgumentParser:
    """A subcommand parser; config-taking commands get the config arguments and field reference.
    ``--debug`` is accepted after the command too (SUPPRESS keeps it from resetting the flag
    given before the command)."""
    p = sub.add_parser(name, help=help, formatter_class=HelpFormatter,
                       epilog=config_reference() if config else None)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    if config:
        add_config_args(p)
    return p


def load(args, config_path=None, *, need_prompts: bool = True) -> TrainConfig:
    """``--config`` (or ``config_path`` when given: a resumed run's own config.yaml) with the
    command line's overrides. ``need_prompts=False`` (``plan``) fills in a placeholder prompt when
    the config names none, instead of refusing it."""
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "gpu_memory", None):
        # quoted: YAML would read a bare `24` as a number, and the field holds a size string
        overrides.append(f"memory.gpu_memory={json.dumps(str(args.gpu_memory))}")
    cfg = load_config(config_path or args.config, overrides, validate_now=need_prompts)
    if not need_prompts:
        if not (cfg.prompts.items or cfg.prompts.file or cfg.prompts.template):
            cfg.prompts = PromptConfig(items=[PLANNING_PROMPT])
        cfg.validate()
    return cfg
