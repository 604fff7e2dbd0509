"""`python -m benchmarks.bench_serving` on the CPU: the path a GPU run takes (both variants prepared as a replica
prepares them, closed-loop clients, threshold decoding, the weights' floor, the profiled round's busy time and
launches), checked on the embedded model, not timed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_serving import with_activity, with_floor
from sinkkernels.timing import DeviceActivity

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_is_batched_passes_times_the_time_to_read_the_weights_over_the_wall_time():
    # 8 clients, one token per request step: 512 request steps, but a batched pass reads the weights once
    row = with_floor({"steps_per_token": 1.0, "output_tokens": 512, "forward_passes": 64, "wall_s": 2.0}, 0.01)
    assert row["engine_steps"] == 64 and row["weights_floor_ms_per_step"] == 10.0
    assert row["floor_fraction"] == pytest.approx(64 * 0.01 / 2.0)


def test_launches_and_busy_time_come_from_the_profiled_round():
    profiled = {"requests": 8, "output_tokens": 512, "forward_passes": 64}
    row = with_activity({"wall_s": 9.0}, profiled, DeviceActivity(wall_s=2.0, busy_s=1.5, launches=6400))
    assert row["busy_fraction"] == 0.75
    assert row["launches_per_token"] == 12.5 and row["launches_per_step"] == 100
    assert row["profiled"] == {"requests": 8, "output_tokens": 512, "engine_steps": 64, "wall_s": 2.0, "busy_s": 1.5,
                               "launches": 6400}


def test_cpu_run_prepares_both_variants_as_a_replica_does(tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_serving", "--device", "cpu", "--model", "embedded",
                             "--layers", "1", "--concurrency", "1,2", "--requests-per-client", "1",
                             "--prompt-tokens", "16", "--max-tokens", "8", "--block", "8", "--graphs", "off",
                             "--threshold", "0.05", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["prepare_dense"]["fused_projections"] == 2  # q/k/v and gate/up of the one block
    assert report["prepare_pruned"]["fused_projections"] == 0  # already fused: the same model
    assert report["prepare_pruned"]["sparse_layers"] == 0  # on a CPU every plan is dense: nn.Linear stays
    rows = report["rows"]
    assert [(r["variant"], r["concurrency"], r["threshold"]) for r in rows] == \
        [("dense", 1, None), ("dense", 2, None), ("dense", 2, 0.05), ("pruned", 1, None), ("pruned", 2, None),
         ("pruned", 2, 0.05)]
    for row in rows:
        profiled = row["profiled"]
        assert row["output_tokens"] == 8 * row["concurrency"] and row["floor_fraction"] > 0
        assert profiled["requests"] == row["concurrency"] and profiled["output_tokens"] == 8 * row["concurrency"]
        assert row["launches_per_step"] * profiled["engine_steps"] == pytest.approx(profiled["launches"])
        assert row["launches_per_token"] * profiled["output_tokens"] == pytest.approx(profiled["launches"])
        assert 0 < profiled["busy_s"] <= profiled["wall_s"] and 0 < row["busy_fraction"] <= 1  # CPU: in operators
        assert row["captured_at_start"]["passes"] == 0 and row["runner"]["captured"] == 0  # a CPU captures nothing
        if row["threshold"] is None:  # one token per request step, the two clients' steps in one batched pass
            assert row["steps_per_token"] == 1 and row["engine_steps"] == 8 and profiled["engine_steps"] == 8
        else:  # this confident, the one-layer model commits the whole block at once
            assert row["steps_per_token"] < 1 and row["engine_steps"] < 8 and profiled["engine_steps"] < 8
    for variant in ("dense", "pruned"):
        one, two = (r for r in rows if r["variant"] == variant and r["threshold"] is None)
        # a batched pass launches what a single one does, and each row's own decoding step on top
        assert two["launches_per_step"] > one["launches_per_step"]
    assert report["linear_weight_bytes"] > 0 and report["copy_bandwidth_bytes_per_s"] > 0
    assert "| dense | off | 1 |  |" in result.stdout and "| pruned | off | 2 | 0.05 |" in result.stdout
