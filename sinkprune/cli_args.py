"""Argument parsing shared by every command-line entry point (`sinkprune`,
`python -m loadtest`, `loadtest.report`, `serve.local`, `deploy/render.py`).

Bad input ends in exit code 2 and one line `PROG: error: WHAT` on stderr, never
a traceback or a usage block; `--help` shows every default. Every numeric argument
has a declared range (`integer`, `number`: NaN refused, infinity only where said),
shown in `--help` and checked while parsing, before any work; every path argument
refuses the empty string, which would otherwise mean the current directory.
"""
from __future__ import annotations

import argparse
import math
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
        if isinstance(kwargs.get("type"), Range):
            kwargs["help"] = (kwargs["help"] + "; " if kwargs.get("help") else "") + f"valid: {kwargs['type']}"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise SystemExit(error_line(self.prog, f"{message} (see {self.prog} --help)"))


def error_line(prog: str, message: str) -> int:
    """Print the one-line error (a message of several lines is joined into one); returns the exit code, 2."""
    message = " / ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def version_string() -> str:
    try:
        return metadata.version("sinkserve")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """`--version`: `PROG VERSION` on stdout, exit 0 (the same on every entry point)."""
    parser.add_argument("--version", action="version", version=f"{parser.prog} {version_string()}")


def _format_bound(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class Range:
    """argparse `type=` for a number within declared bounds; the error names the value and the range.

    `integer(lo, hi)` and `number(lo, hi, ...)` make them. NaN is never accepted; infinity only
    with `allow_inf` (and then only where the bounds allow it)."""

    def __init__(self, kind: type, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
                 allow_inf: bool = False):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.lo_open, self.hi_open, self.allow_inf = lo_open, hi_open, allow_inf

    def __str__(self) -> str:
        if self.kind is int:
            return f"{self.lo}..{self.hi}"
        return (f"{'(' if self.lo_open else '['}{_format_bound(self.lo)}, "
                f"{_format_bound(self.hi)}{')' if self.hi_open else ']'}")

    def contains(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __call__(self, text: str):
        try:
            value = self.kind(text.strip()) if self.kind is int else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}; "
                                             f"valid: {self}") from None
        if self.kind is float and math.isnan(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (NaN); valid: {self}")
        if self.kind is float and math.isinf(value) and not self.allow_inf:
            raise argparse.ArgumentTypeError(f"{text!r} is not finite; valid: {self}")
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{text.strip()} is outside {self}")
        return value


def integer(lo: int, hi: int) -> Range:
    """An integer in lo..hi, both included."""
    return Range(int, lo, hi)


def number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> Range:
    """A float in [lo, hi] (open ends as said); NaN refused, infinity only with `allow_inf`."""
    return Range(float, lo, hi, lo_open, hi_open, allow_inf)


# Ranges shared by several entry points.
SEED = integer(0, 2**63 - 1)
COUNT = integer(1, 1_000_000)  # windows, samples, requests, ...
SEQ_LEN = integer(2, 1_048_576)  # also checked against the model's own maximum once its config is read
STEPS = integer(1, 1_000_000)


def nonempty_path(value: str) -> str:
    """argparse `type=` for any path: the empty string (which would mean the current directory) is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is an empty path (it would mean the current directory); "
                                         "name a file or directory")
    return value


def output_dir(value: str) -> str:
    """argparse `type=` for an output directory: not empty; the rest (the current directory, a parent
    of it, home, `/`, a source) is refused by `sinkprune.safe_output.check_output`, naming it."""
    return nonempty_path(value)


def as_path(value: str):
    """`nonempty_path`, as a `pathlib.Path`."""
    from pathlib import Path

    return Path(nonempty_path(value))


def output_file(value: str) -> str:
    """argparse `type=` for a file to write: not empty, not a directory, in a directory that exists."""
    from pathlib import Path

    path = Path(nonempty_path(value)).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a directory, not a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory of {value!r} does not exist")
    return value


def existing_dir(value: str) -> str:
    """argparse `type=` for a directory that must exist."""
    from pathlib import Path

    path = Path(nonempty_path(value)).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory {value!r} does not exist" if not path.exists()
                                         else f"{value!r} is not a directory")
    return value


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

    path = Path(nonempty_path(value)).expanduser()
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
