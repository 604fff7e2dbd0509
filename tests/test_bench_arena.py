"""The KV-arena benchmark: both reads of the runner's block pass are timed and reported."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arena(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_arena", "--device", "cpu", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_small_cpu_run_times_the_view_and_the_gathered_read(tmp_path):
    out = tmp_path / "deep" / "arena.json"
    result = arena(tmp_path, "--d-model", "64", "--heads", "4", "--rows", "3", "--block", "4", "--context", "40",
                   "--warmup", "1", "--reps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [row["read"] for row in report["results"]] == ["view", "gathered"]
    assert all(row["ms"] > 0 and row["kv_gb_per_s"] > 0 for row in report["results"])
    assert report["kv_bytes"] == 2 * 2 * 3 * 40 * 64 * 4  # keys and values, 2 layers, 3 rows, float32
    assert report["config"]["context"] == 40 and "--context 40" in report["command"]
    assert "| view |" in result.stdout and "| gathered |" in result.stdout


def test_grouped_query_heads_count_the_shared_keys_and_values_once(tmp_path):
    out = tmp_path / "arena.json"
    result = arena(tmp_path, "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--rows", "2", "--block", "4",
                   "--context", "24", "--warmup", "1", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kv_bytes"] == 2 * 2 * 2 * 24 * 32 * 4 and report["config"]["kv_heads"] == 2  # 2 heads of 16


def test_bad_shapes_are_refused_with_exit_code_2(tmp_path):
    for args, message in ((["--block", "9", "--context", "4"], "longer than --context"),
                          (["--d-model", "100", "--heads", "3"], "does not split"),
                          (["--heads", "4", "--kv-heads", "3"], "groups of --kv-heads"),
                          (["--rows", "0"], "outside")):
        result = arena(tmp_path, *args, "--out", str(tmp_path / "a.json"))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "a.json").exists()
