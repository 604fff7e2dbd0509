"""The `sinkprune` command line: one sub-command per offline job.

Each command lives in its own module exposing `register(subparsers)`, which adds
its parser and sets `func`; this file only assembles them. Bad input exits with
code 2 and a message naming what is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sinkprune.cli_args import Formatter, Parser, add_version_flag, error_line

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


def model_config(model: str):
    """The DLMConfig of `--model` from its config.json alone (no weights read), so the arguments
    that depend on the model are checked before anything is allocated."""
    from sinkprune.dlm.loading import read_config, resolve_model_dir

    return read_config(resolve_model_dir(model))


def check_length(flag: str, value: int, config, model: str, plus: int = 0, plus_what: str = "") -> None:
    """UsageError unless `value` tokens (and `plus` more: `plus_what`) fit the model's maximum sequence length."""
    limit = config.max_position_embeddings
    if value + plus > limit:
        total = f" with {plus} of {plus_what} ({value + plus} tokens)" if plus else ""
        raise UsageError(f"{flag} {value}{total} exceeds the {limit}-token maximum sequence length of the model "
                         f"{model!r} (its config.json)")


def check_windows(flag: str, asked: int, found: int, text: str, seq_len: int) -> None:
    """UsageError when `text` (e.g. "the calibration split") holds fewer windows than asked (never silently fewer)."""
    if found < asked:
        raise UsageError(f"{flag} {asked}: {text} holds only {found} windows of {seq_len} tokens; "
                         f"ask for at most {found} (or a shorter --seq-len)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sinkprune", description=__doc__.splitlines()[0])
    add_version_flag(parser)
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
    except OSError as err:  # the machine's answer (permissions, a full disk): one line naming the file
        return error_line(f"sinkprune {args.command}", str(err))


if __name__ == "__main__":
    sys.exit(main())
