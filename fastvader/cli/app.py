"""The ``fastvader`` command: train, plan, profile, sample, eval, export, env, models.

Every config field can be overridden with ``--set section.key=value``; ``fastvader train --help``
lists every field with its default. One module per command in this package; each adds its
parser (``add_parser``) and runs it (``run``).

A mistake (a config value, a file, a device, an unreachable model) ends in one line
``fastvader: ...`` and exit status 2; a guard that stops a run in one line and status 1. Add
``--debug`` (or set FASTVADER_DEBUG=1) to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastvader.cli import env, evaluate, export, models, plan, profile, sample, train
from fastvader.cli.common import DEBUG_HELP, HelpFormatter
from fastvader.console import readable_warnings
from fastvader.errors import UserError, one_line
from fastvader.monitoring.guards import NonFiniteError
from fastvader.monitoring.selfcheck import SelfCheckError
from fastvader.training.interrupt import EXIT_INTERRUPTED

COMMANDS = (train, plan, profile, sample, evaluate, export, env, models)

#: exit statuses: a user mistake, a guard that stopped a run, a bug
EXIT_USER_ERROR, EXIT_STOPPED, EXIT_BUG = 2, 1, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvader", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("FASTVADER_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with readable_warnings():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM; a run that saved its work says where
        print(f"fastvader: {err or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`fastvader models --json | head`): stop quietly
        _silence_stdout()
        return 0
    except Exception as err:
        if debug_requested(args):
            raise
        status, message = describe_failure(err)
        print(f"fastvader: {message}", file=sys.stderr)
        return status


def describe_failure(err: BaseException) -> tuple[int, str]:
    """The exit status and the one line that ``main`` prints for an exception."""
    if isinstance(err, (NonFiniteError, SelfCheckError)):  # a guard stopped the run and says why
        return EXIT_STOPPED, one_line(err)
    if isinstance(err, (UserError, FileNotFoundError)):
        return EXIT_USER_ERROR, one_line(err)
    if isinstance(err, OSError) and err.filename is not None:  # a path the user gave cannot be used
        return EXIT_USER_ERROR, one_line(f"{err.filename}: {err.strerror or err}; check the path and its permissions "
                                         "(an output folder must be a writable folder, not a file)")
    return EXIT_BUG, one_line(f"unexpected {type(err).__name__}: {err} (a bug in fastvader or a case it does not "
                              "handle yet; run again with --debug for the traceback and report it)")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
