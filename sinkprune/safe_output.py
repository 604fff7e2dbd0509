"""Output directories that never lose data and never appear half written.

Every command that writes a directory goes through `staged_output`:

- an empty path, the current directory, a parent of it, the home directory (or a
  parent of it) and `/` are always refused: `--out-dir ""`, `.`, `..`, `~` or a
  symlink to the working directory never replace it;
- an existing non-empty output directory is refused (`OutputError`, naming it)
  unless the user passed `--overwrite`, and even then it is replaced only when it
  holds a previous output of ours and nothing else: a pruned artifact whose
  `sinkprune.json` lists every other file in it, or (for commands that write
  fixed names: reports, load tests, tokenizers, ...) only the names that command
  writes. A directory holding anything else is refused, naming what it holds;
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

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OVERWRITE_HELP = ("replace a non-empty output directory that holds a previous output of this command and nothing "
                  "else (never a source model's, never other files)")
MANIFEST = "sinkprune.json"  # as sinkprune.dlm.artifact_io.MANIFEST (not imported: that pulls in torch)


class OutputError(ValueError):
    """An output directory that must not be written; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _protected(path: Path) -> str | None:
    """Why `path` (resolved) must never be an output directory, or None."""
    cwd, home = Path.cwd().resolve(), Path.home().expanduser().resolve()
    if path == cwd:
        return "is the current directory"
    if path in cwd.parents:
        return "contains the current directory"
    if path == home:
        return "is the home directory"
    if path in home.parents:
        return "contains the home directory"
    return None


def manifest_files(directory: Path) -> set[str] | None:
    """The file names a pruned artifact's `sinkprune.json` lists (with itself), or None when there is
    no readable manifest of that shape."""
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(name, str) for name in files):
        return None
    return set(files) | {MANIFEST}


def foreign_entries(directory: Path, ours: Collection[str] | None = None) -> list[str]:
    """What in `directory` is not a previous output of ours (sorted names, `/` after directories).

    `ours=None`: a pruned artifact, recognised by its manifest: every entry is a file listed in
    `sinkprune.json`. Otherwise every entry must bear one of the names in `ours` (what the command
    writes)."""
    allowed = (manifest_files(directory) or set()) if ours is None else set(ours)
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name in allowed and (ours is not None or (entry.is_file() and not entry.is_symlink())):
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return foreign


def check_output(out: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                 ours: Collection[str] | None = None) -> Path:
    """The resolved output path, or OutputError if writing there could lose data.

    `ours`: the names the command writes into the directory, so `overwrite` may replace one
    holding only those; None (pruned artifacts): only a directory whose `sinkprune.json` lists
    everything in it."""
    if not str(out).strip():
        raise OutputError(f"output directory {str(out)!r} is an empty path (it would mean the current directory); "
                          "name a directory")
    path = Path(out).expanduser().resolve()
    reason = _protected(path)
    if reason:
        raise OutputError(f"output directory {out} ({path}) {reason}: refusing to write there, "
                          "--overwrite or not; name a new directory")
    for source in sources:
        src = Path(source).expanduser().resolve()
        if path == src or src in path.parents:
            raise OutputError(f"output directory {path} is {'the' if path == src else 'inside the'} "
                              f"source {src}: refusing to write there")
        if path in src.parents:
            raise OutputError(f"output directory {path} contains the source {src}: refusing to write there")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError(f"output directory {path} is not empty; pass --overwrite to replace it")
        foreign = foreign_entries(path, ours)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            what = (f"is not a pruned artifact whose {MANIFEST} lists everything in it" if ours is None
                    else "holds what this command does not write")
            raise OutputError(f"output directory {path} {what} ({shown}): --overwrite replaces only a previous "
                              "output of ours; remove it yourself or name another directory")
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
def staged_output(out: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                  ours: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out`, on any error it is removed.

    The checks of `check_output` (with `ours`) run on entry (before any work) and again at the
    rename, so a directory filled by someone else meanwhile is not replaced."""
    sources = list(sources)
    path = check_output(out, overwrite, sources, ours)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        check_output(path, overwrite, sources, ours)
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
