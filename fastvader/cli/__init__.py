"""The ``fastvader`` command line (``fastvader.cli.app``); one module per command."""
from fastvader.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
