"""What every config-taking command shares: --config/--set/--device, loading, and the field
reference printed under --help."""
from __future__ import annotations

import argparse
import dataclasses

from fastvader.config import TrainConfig, load_config


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
    """A subcommand parser; config-taking commands get the config arguments and field reference."""
    p = sub.add_parser(name, help=help, formatter_class=HelpFormatter,
                       epilog=config_reference() if config else None)
    if config:
        add_config_args(p)
    return p


def load(args, config_path=None) -> TrainConfig:
    """``--config`` (or ``config_path`` when given) with the command line's overrides."""
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "gpu_memory", None):
        overrides.append(f"memory.gpu_memory={args.gpu_memory}")
    return load_config(config_path or args.config, overrides)
