"""Crash-isolated tasks: a segfault or a hang costs its own task, and the tasks after it still run."""
import signal
from pathlib import Path

from sinkkernels.isolated import run_isolated

ROOT = Path(__file__).resolve().parents[1]


def test_a_crash_and_a_hang_cost_one_task_each_and_the_rest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    tasks = [{"x": 1}, {"x": 2, "crash": True}, {"x": 3}, {"x": 4, "fail": True}, {"x": 5, "hang": True}, {"x": 6}]
    progress = []
    entries = run_isolated("tests.isolated_worker:square", tasks, tmp_path / "run", task_seconds=3,
                           total_seconds=60, on_progress=progress.append)
    assert [entry["task"] for entry in entries] == tasks
    assert [entry["state"] for entry in entries] == ["done", "crashed", "done", "error", "timed out", "done"]
    assert [entries[i]["result"]["square"] for i in (0, 2, 5)] == [1, 9, 36]
    assert entries[1]["returncode"] == -signal.SIGSEGV
    assert entries[3]["message"] == "ValueError: task 4 is bad"
    pids = [entries[i]["result"]["pid"] for i in (0, 2, 5)]
    assert pids[0] != pids[1] != pids[2]  # a new child after the crash and after the hang
    assert progress and progress[-1] <= len(tasks)


def test_a_child_that_cannot_start_ends_the_run_with_every_task_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    entries = run_isolated("tests.no_such_module:square", [{"x": 1}, {"x": 2}], tmp_path / "run", task_seconds=5,
                           total_seconds=60)
    assert [entry["state"] for entry in entries] == ["not run", "not run"]
    assert "No module named 'tests.no_such_module'" in (tmp_path / "run" / "children.log").read_text()


def test_the_total_time_box_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    entries = run_isolated("tests.isolated_worker:square", [{"x": 1, "hang": True}, {"x": 2}], tmp_path / "run",
                           task_seconds=30, total_seconds=4)
    assert [entry["state"] for entry in entries] == ["timed out", "not run"]
