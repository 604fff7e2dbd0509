"""The `sinkprune` command line: one sub-command per offline job.

Each command lives in its own module exposing `register(subparsers)`, which adds
its parser and sets `func`; this file only assembles them. Bad input exits with
code 2 and a message naming what is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sinkprune.cli_args import Formatter, Parser, error_line, version_string

COMMAND_MODULES = [
    "sinkprune.commands.generate",
    "sinkprune.commands.corpus",
    "sinkprune.commands.train",
    "sinkprune.commands.analyze",
    "sinkprune.commands.prune",
    "sinkprune.commands.eval",
    "sinkprune.commands.compare",
    "sinkprune.commands.ship",
    "sinkprune.commands.adopt",
]


class UsageError(Exception):
    """Raised by a command for bad input; printed and turned into exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sinkprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sinkprune {version_string()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        command.formatter_class = Formatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from sinkprune.dlm.errors import ModelLoadError
    from sinkprune.safe_output import OutputError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, OutputError, ModelLoadError) as err:
        return error_line(f"sinkprune {args.command}", str(err))


if __name__ == "__main__":
    sys.exit(main())
