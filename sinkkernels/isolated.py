"""Run tasks that may kill their process (a segfault inside a vendor library) in child processes, so that a crash
costs one task, not the run.

A child works through the tasks in order and appends one journal line when it starts a task and one when it
finishes it. When a child dies (a signal, or a task running past its time), the task it had started is recorded
as crashed or timed out, and a new child goes on with the next one. Used to survey cuSPARSELt's algorithms,
some of which crashed the process on an H200 (`benchmarks.cusparselt_algs`).

    python -m sinkkernels.isolated MODULE:FUNCTION TASKS.json JOURNAL.jsonl   (the child; run_isolated starts it)
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.05


def read_journal(journal: Path) -> dict[int, dict]:
    """The last line written for each task index (a line cut short by a crash is ignored)."""
    last: dict[int, dict] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            last[entry["index"]] = entry
    return last


def _append(journal: Path, entry: dict) -> None:
    with journal.open("a") as file:
        file.write(json.dumps(entry) + "\n")
        file.flush()
        os.fsync(file.fileno())


def work(function: Callable[[dict], dict], tasks: list[dict], journal: Path) -> None:
    """The child: every task without a journal entry, in order; an exception is that task's error."""
    done = read_journal(journal)
    for index, task in enumerate(tasks):
        if index in done:
            continue
        _append(journal, {"index": index, "state": "started"})
        try:
            entry = {"index": index, "state": "done", "result": function(task)}
        except Exception as error:  # noqa: BLE001 - the task's failure is its result, the survey goes on
            entry = {"index": index, "state": "error", "message": f"{type(error).__name__}: {error}"}
        _append(journal, entry)


def run_isolated(target: str, tasks: list[dict], folder: Path, task_seconds: float, total_seconds: float,
                 command_prefix: tuple[str, ...] = (), on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run `target` ("module:function", taking a task dict and returning a JSON-able dict) on every task in
    children, replacing each child that dies; returns one entry per task, in order, with its `state`: done
    (`result`), error (`message`), crashed (`returncode`), timed out, or not run (the total time ran out).
    `command_prefix` wraps the child (for example a memory checker)."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks_file, journal = folder / "tasks.json", folder / "journal.jsonl"
    tasks_file.write_text(json.dumps(tasks))
    journal.unlink(missing_ok=True)
    deadline = time.monotonic() + total_seconds
    command = [*command_prefix, sys.executable, "-m", "sinkkernels.isolated", target, str(tasks_file), str(journal)]
    with (folder / "children.log").open("w") as log:
        while time.monotonic() < deadline and len(read_journal(journal)) < len(tasks):
            before = read_journal(journal)
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _watch(child, journal, task_seconds, deadline, on_progress)
            if read_journal(journal) == before:  # died before starting a task (children.log says why)
                break
    entries = read_journal(journal)
    return [{"task": task, **{k: v for k, v in entries.get(index, {"state": "not run"}).items() if k != "index"}}
            for index, task in enumerate(tasks)]


def _watch(child: subprocess.Popen, journal: Path, task_seconds: float, deadline: float,
           on_progress: Callable[[int], None] | None) -> None:
    """Wait for `child`; kill it when its current task or the whole run is out of time; record how the task
    it was running ended."""
    current, since, reported = None, time.monotonic(), 0
    while child.poll() is None:
        entries = read_journal(journal)
        started = [index for index, entry in entries.items() if entry["state"] == "started"]
        if started and started[-1] != current:
            current, since = started[-1], time.monotonic()
        if on_progress is not None and len(entries) != reported:
            reported = len(entries)
            on_progress(sum(entry["state"] != "started" for entry in entries.values()))
        now = time.monotonic()
        if now > deadline or (current is not None and now - since > task_seconds):
            child.kill()
            child.wait()
            if current is not None and entries.get(current, {}).get("state") == "started":
                _append(journal, {"index": current, "state": "timed out", "seconds": round(now - since, 1)})
            return
        time.sleep(POLL_SECONDS)
    entries = read_journal(journal)
    running = [index for index, entry in entries.items() if entry["state"] == "started"]
    for index in running:  # the child died inside this task
        _append(journal, {"index": index, "state": "crashed", "returncode": child.returncode})


def main(argv: list[str]) -> None:
    target, tasks_file, journal = argv
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    work(function, json.loads(Path(tasks_file).read_text()), Path(journal))


if __name__ == "__main__":
    main(sys.argv[1:])
