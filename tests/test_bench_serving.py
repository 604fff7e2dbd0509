"""`python -m benchmarks.bench_serving` on the CPU: the path a GPU run takes (both variants prepared as a replica
prepares them, closed-loop clients, the weights' floor), checked on the embedded model, not timed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_serving import with_floor

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_is_steps_times_the_time_to_read_the_weights_over_the_wall_time():
    row = with_floor({"steps_per_token": 0.5, "output_tokens": 64, "wall_s": 2.0}, 0.01)
    assert row["engine_steps"] == 32 and row["weights_floor_ms_per_step"] == 10.0
    assert row["floor_fraction"] == pytest.approx(32 * 0.01 / 2.0)


def test_cpu_run_prepares_both_variants_as_a_replica_does(tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_serving", "--device", "cpu", "--model", "embedded",
                             "--layers", "1", "--concurrency", "1,2", "--requests-per-client", "1",
                             "--prompt-tokens", "16", "--max-tokens", "8", "--block", "8", "--graphs", "off",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["prepare_dense"]["fused_projections"] == 2  # q/k/v and gate/up of the one block
    assert report["prepare_pruned"]["fused_projections"] == 0  # already fused: the same model
    assert report["prepare_pruned"]["sparse_layers"] == 0  # on a CPU every plan is dense: nn.Linear stays
    assert [(r["variant"], r["concurrency"]) for r in report["rows"]] == \
        [("dense", 1), ("dense", 2), ("pruned", 1), ("pruned", 2)]
    for row in report["rows"]:
        assert row["output_tokens"] == 8 * row["concurrency"] and 0 < row["steps_per_token"] <= 1
        assert row["floor_fraction"] > 0 and row["engine_steps"] >= 8
    assert report["linear_weight_bytes"] > 0 and report["copy_bandwidth_bytes_per_s"] > 0
    assert "| dense | off | 1 |" in result.stdout
