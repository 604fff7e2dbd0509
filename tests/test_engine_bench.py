"""`python -m benchmarks.bench_engine` runs end to end and reports what the issue asks for."""
from __future__ import annotations

import json

from benchmarks import bench_engine


def test_bench_reports_load_and_variants(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--random-tiny", "--dtype", "float64", "--requests", "2", "--concurrency", "1,2",
                              "--prompt-tokens", "4", "--max-tokens", "4", "--block-length", "2",
                              "--nll-samples", "1", "--threshold", "0.9,0.5", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    reference, *engine = results["load"]
    assert reference["label"] == "reference generate()" and [r["concurrency"] for r in engine] == [1, 2]
    for row in results["load"]:
        assert row["agreement_with_baseline"] == 1.0  # the engine reproduces the reference loop (float64)
        for key in ("output_tokens_per_s", "requests_per_s", "latency_ms_p50", "latency_ms_p95",
                    "latency_ms_p99", "forward_passes_per_token"):
            assert row[key] > 0
    assert engine[1]["forward_passes_per_token"] < engine[0]["forward_passes_per_token"]  # batching
    labels = [v["label"] for v in results["variants"]]
    assert labels == ["fixed steps", "threshold 0.9", "threshold 0.5", "prefix cache", "dual cache",
                      "threshold 0.9 + prefix cache", "threshold 0.9 + dual cache"]
    variants = {v["label"]: v for v in results["variants"]}
    computed = {label: v["computed_positions_per_token"] for label, v in variants.items()}
    assert computed["dual cache"] < computed["prefix cache"] < computed["fixed steps"]
    assert all("delta_nll_vs_baseline" in v for v in results["variants"][1:])
    assert "offered load" in capsys.readouterr().out
