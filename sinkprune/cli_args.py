"""Argument parsing shared by every command-line entry point (`sinkprune`,
`python -m loadtest`, `loadtest.report`, `serve.local`, `deploy/render.py`).

Bad input ends in exit code 2 and one line `PROG: error: WHAT` on stderr, never
a traceback or a usage block; `--help` shows every default.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows defaults, except where a help text already does or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `PROG: error: MESSAGE (see PROG --help)`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        default = kwargs.get("default")
        shown = not (default is None or default is False or default == argparse.SUPPRESS)
        if kwargs.get("help") is None and shown and args[0].startswith("-"):
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise SystemExit(error_line(self.prog, f"{message} (see {self.prog} --help)"))


def error_line(prog: str, message: str) -> int:
    """Print the one-line error; returns the exit code, 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def version_string() -> str:
    try:
        return metadata.version("sinkserve")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def device(value: str) -> str:
    """argparse `type=` for `--device`: a device that exists on this machine, or an error listing those that do."""
    import torch

    try:
        parsed = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device name; available: "
                                         f"{', '.join(available_devices())}") from None
    available = available_devices()
    name = parsed.type if parsed.index is None else f"{parsed.type}:{parsed.index}"
    if parsed.type == "cpu" or name in available or (parsed.index is None and
                                                      any(a.startswith(parsed.type + ":") for a in available)):
        return value
    raise argparse.ArgumentTypeError(f"device {value!r} is not available on this machine; available: "
                                     f"{', '.join(available)}")


def add_unverified_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unverified", action="store_true",
                        help="load a model directory that declares a sparsity/quantization config without a "
                             "matching sinkprune.json (warns)")


def existing_file(value: str) -> str:
    """argparse `type=` for an input file that must exist."""
    from pathlib import Path

    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {value!r} does not exist" if not path.exists()
                                         else f"{value!r} is not a file")
    return value


def port_number(value: str) -> int:
    """argparse `type=` for a TCP port."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..65535")
    return port
