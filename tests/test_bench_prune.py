"""The offline-stage benchmarks run end to end on a small sharded checkpoint and report what they promise."""
from __future__ import annotations

import json

from benchmarks import bench_prune, dtype_masks
from benchmarks.random_checkpoint import write_random_checkpoint
from sinkprune.dlm.loading import read_config
from tests.test_scale import NARROW


def test_bench_prune_reports_every_stage_with_flops_rss_and_the_estimate(tmp_path):
    source = write_random_checkpoint(tmp_path / "m", "llada-8b", layers=2, overrides=NARROW)
    out = tmp_path / "bench.json"
    assert bench_prune.main(["--model", str(source), "--calibration-windows", "2", "--seq-len", "32", "--every", "25",
                             "--eval-windows", "2", "--eval-samples", "1", "--hidden-states", "disk",
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["load", "dense quality", "sink mass", "calibrate+prune", "pruned quality", "write"]
    config = read_config(source)
    # sink mass: 2 timesteps x 2 windows x 32 tokens through 2 blocks, no head
    per_token = 2 * (4 * 128 * 128 + 3 * 128 * 384) + 4 * 128 * 32
    assert stages["sink mass"]["gflop"] == round(2 * 2 * 32 * config.num_layers * per_token / 1e9, 1)
    assert all(row["seconds"] > 0 and row["peak_rss_gib"] > 0 for row in report["stages"])
    # the default method (sink-sparsegpt) calibrates on the 2 windows noised at 2 timesteps
    assert report["settings"]["method"] == "sink-sparsegpt" and report["settings"]["samples"] == 4
    assert 0 < stages["calibrate+prune"]["solve_seconds"] <= stages["calibrate+prune"]["seconds"]
    assert report["memory_estimate"]["place"] == "disk" and report["peak_rss_bytes"] >= report["baseline_rss_bytes"]
    assert "vs_dense" in report["quality"]["pruned"]


def test_dtype_masks_compares_float32_and_bfloat16_calibration(tmp_path):
    source = write_random_checkpoint(tmp_path / "m", "llada-8b", layers=1, overrides=NARROW)
    out = tmp_path / "masks.json"
    assert dtype_masks.main(["--model", str(source), "--calibration-windows", "2", "--every", "25",
                             "--eval-windows", "2", "--eval-samples", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["differing_share"] <= 1 and len(report["differing_share_per_layer"]) == 7
    assert set(report["quality"]) == {"dense", "float32", "bfloat16"}
    assert "delta_nll" in report["bfloat16_vs_float32"]
