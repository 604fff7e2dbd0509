"""The pruning comparison table."""
from __future__ import annotations

import torch

from sinkprune.compare import CompareSettings, markdown_table, run_comparison
from tests.conftest import random_model


def test_comparison_pairs_every_model_with_dense_and_sink_methods_with_their_baseline():
    dense = random_model("llada", dtype=torch.float32)
    windows = {seed: torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)}
    evaluation = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(9))
    settings = CompareSettings(["magnitude", "wanda", "sink-wanda"], ["2:4"], [0, 1], [0.5, 1.0], eval_samples=2)
    report = run_comparison(dense, windows, evaluation, settings, progress=False)
    rows = report["rows"]
    assert [(r["method"], r["calibration_seed"]) for r in rows] == [
        ("magnitude", 0), ("wanda", 0), ("sink-wanda", 0), ("wanda", 1), ("sink-wanda", 1)]
    for row in rows:
        assert abs(row["vs_dense"]["delta_nll"] - (row["nll"] - report["dense"]["nll"])) < 1e-4
        assert ("vs_baseline" in row) == (row["method"] == "sink-wanda")
    # the dense model itself was not pruned by the comparison
    assert all((p != 0).all() for n, p in dense.named_parameters() if "blocks" in n and p.dim() == 2)
    table = markdown_table(report)
    assert table.count("\n") == 3 + len(rows)
    assert "(vs wanda)" in table
