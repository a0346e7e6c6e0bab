"""The ``fastvader`` command: train, plan, profile, sample, eval, export, env, models.

Every config field can be overridden with ``--set section.key=value``; ``fastvader train --help``
lists every field with its default. One module per command in this package; each adds its
parser (``add_parser``) and runs it (``run``).
"""
from __future__ import annotations

import argparse
import sys

from fastvader.cli import env, evaluate, export, models, plan, profile, sample, train
from fastvader.cli.common import HelpFormatter
from fastvader.config import ConfigError
from fastvader.monitoring.guards import NonFiniteError
from fastvader.monitoring.selfcheck import SelfCheckError

COMMANDS = (train, plan, profile, sample, evaluate, export, env, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvader", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"fastvader: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, SelfCheckError) as err:  # a guard stopped the run: say why, no traceback
        print(f"fastvader: {err}", file=sys.stderr)
        return 1
