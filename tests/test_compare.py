"""The pruning comparison table."""
from __future__ import annotations

import torch

from sinkprune.compare import CompareSettings, choice_text, markdown_table, run_comparison
from tests.conftest import random_model


def test_comparison_pairs_every_model_with_dense_and_sink_methods_with_their_baseline():
    dense = random_model("llada", dtype=torch.float32)
    windows = {seed: torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)}
    evaluation = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(9))
    settings = CompareSettings(["magnitude", "wanda", "sink-wanda"], ["2:4"], [0, 1], [0.5, 1.0], eval_samples=2)
    report = run_comparison(dense, windows, evaluation, settings, progress=False)
    rows = report["rows"]
    assert [(r["method"], r["calibration_seed"]) for r in rows] == [  # default: noised only, our historical rows
        ("magnitude", 0), ("wanda", 0), ("sink-wanda", 0), ("wanda", 1), ("sink-wanda", 1)]
    for row in rows:
        assert abs(row["vs_dense"]["delta_nll"] - (row["nll"] - report["dense"]["nll"])) < 1e-4
        assert ("vs_baseline" in row) == (row["method"] == "sink-wanda")
    # the dense model itself was not pruned by the comparison
    assert all((p != 0).all() for n, p in dense.named_parameters() if "blocks" in n and p.dim() == 2)
    table = markdown_table(report)
    assert table.count("\n") == 3 + len(rows)
    assert "(vs wanda, noised)" in table
    # and the choice `sinkprune compare` prints at its end: the lowest mean gap to dense over the draws
    best = min(("magnitude", "wanda", "sink-wanda"), key=lambda m: sum(
        r["vs_dense"]["delta_nll"] for r in rows if r["method"] == m) / sum(r["method"] == m for r in rows))
    assert report["choice"]["2:4"]["method"] == best
    assert choice_text(report).startswith("The choice") and f"2:4: {best}" in choice_text(report)


def test_sink_rows_on_noised_windows_are_also_paired_with_the_clean_reference_baseline():
    dense = random_model("llada", dtype=torch.float32)
    windows = {0: torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(0))}
    evaluation = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(9))
    settings = CompareSettings(["wanda", "sink-wanda"], ["2:4"], [0], [0.5, 1.0], eval_samples=2,
                               calibrations=["noised", "clean"], extra_sink_weightings=["per-timestep"])
    rows = run_comparison(dense, windows, evaluation, settings, progress=False)["rows"]
    # the reference's (clean) baselines come first, so every later row can be paired with them
    assert [(r["calibration"], r["method"], r["sink_weighting"]) for r in rows] == [
        ("clean", "wanda", "-"), ("clean", "sink-wanda", "mean"),
        ("noised", "wanda", "-"), ("noised", "sink-wanda", "mean"), ("noised", "sink-wanda", "per-timestep")]
    by_key = {(r["calibration"], r["method"], r["sink_weighting"]): r for r in rows}
    clean_sink, noised_sink = by_key[("clean", "sink-wanda", "mean")], by_key[("noised", "sink-wanda", "mean")]
    assert "vs_reference_baseline" not in clean_sink  # its own baseline already is the reference one
    reference = noised_sink["vs_reference_baseline"]
    assert reference["calibration"] == "clean" and noised_sink["vs_baseline"]["calibration"] == "noised"
    expected = noised_sink["nll"] - by_key[("clean", "wanda", "-")]["nll"]
    assert abs(reference["delta_nll"] - expected) < 1e-4
    assert "(per-timestep)" in markdown_table({"dense": {"nll": 1.0, "perplexity": 2.7}, "rows": rows})
