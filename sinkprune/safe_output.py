"""Output directories that never lose data and never appear half written.

Every command that writes a directory goes through `staged_output`:

- an existing non-empty output directory is refused (`OutputError`, naming it)
  unless the user passed `--overwrite`;
- an output equal to, inside, or containing a source (the model being pruned,
  the run being shipped) is always refused, `--overwrite` or not;
- the command writes into a temporary sibling (`.NAME.partial-XXXX`, in the same
  parent, so the final rename stays on one file system); only when it finished
  is that renamed into place. A killed run leaves the old directory as it was
  (plus the hidden partial sibling), never a half artifact; `--overwrite`
  replaces the whole directory, so no stale shard or index survives.
- the files get the permissions of a normal `open()` (0644 under umask 022),
  not the 0600 of temporary files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OVERWRITE_HELP = "replace a non-empty output directory (never a source model's)"


class OutputError(ValueError):
    """An output directory that must not be written; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(out: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Path:
    """The resolved output path, or OutputError if writing there could lose data."""
    path = Path(out).expanduser().resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if path == src or src in path.parents:
            raise OutputError(f"output directory {path} is {'the' if path == src else 'inside the'} "
                              f"source {src}: refusing to write there")
        if path in src.parents:
            raise OutputError(f"output directory {path} contains the source {src}: refusing to write there")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return path


def set_normal_modes(paths: Iterable[Path]) -> None:
    """Give each path the mode a plain open()/mkdir() would (0644/0755 under umask 022)."""
    mask = _umask()
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def normalize_permissions(root: Path) -> None:
    """`set_normal_modes` on `root` and everything under it."""
    set_normal_modes([root, *root.rglob("*")])


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out`, on any error it is removed.

    The checks of `check_output` run on entry (before any work) and again at the
    rename, so a directory filled by someone else meanwhile is not replaced."""
    sources = list(sources)
    path = check_output(out, overwrite, sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        check_output(path, overwrite, sources)
        normalize_permissions(staging)
        _publish(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        staging.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def add_overwrite_flag(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
