"""The pruning comparison: every method x pattern x calibration draw, scored on
the same evaluation masks as the dense model (paired), with each sink-aware
method also paired against its own baseline at matched sparsity."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from sinkprune.dlm.likelihood import LikelihoodResult, estimate_nll, paired_difference
from sinkprune.prune import PruneSettings, prune_model

BASELINE_OF = {"sink-wanda": "wanda", "sink-sparsegpt": "sparsegpt"}


@dataclass
class CompareSettings:
    methods: list[str]
    patterns: list[str]
    calibration_seeds: list[int]
    timesteps: list[float]
    eval_samples: int = 16
    eval_seed: int = 0


def run_comparison(dense, calibration: dict[int, torch.Tensor], eval_windows: torch.Tensor,
                   settings: CompareSettings, progress: bool = True) -> dict:
    """`calibration` maps each calibration seed to its windows. Returns a report dict
    with one row per (pattern, method, seed) and the dense reference."""
    score = lambda model: estimate_nll(model, eval_windows, settings.eval_samples, settings.eval_seed)  # noqa: E731
    dense_result = score(dense)
    rows = []
    results: dict[tuple, LikelihoodResult] = {}
    for pattern in settings.patterns:
        for seed in settings.calibration_seeds:
            for method in settings.methods:
                if method == "magnitude" and seed != settings.calibration_seeds[0]:
                    continue  # magnitude pruning uses no calibration data
                began = time.perf_counter()
                model = copy.deepcopy(dense)
                prune_model(model, PruneSettings(method, pattern, settings.timesteps, seed), calibration[seed])
                result = score(model)
                results[(pattern, method, seed)] = result
                row = {"pattern": pattern, "method": method, "calibration_seed": seed, **result.to_dict(),
                       "vs_dense": paired_difference(dense_result, result).to_dict(),
                       "seconds": round(time.perf_counter() - began, 1)}
                baseline = results.get((pattern, BASELINE_OF.get(method), seed))
                if baseline is not None:
                    row["vs_baseline"] = {"baseline": BASELINE_OF[method], **paired_difference(baseline, result).to_dict()}
                rows.append(row)
                if progress:
                    print(_line(row), flush=True)
    return {"dense": dense_result.to_dict(), "rows": rows, "settings": settings.__dict__}


def _line(row: dict) -> str:
    text = (f"{row['pattern']:>16} {row['method']:>15} seed {row['calibration_seed']}: nll {row['nll']:.4f} "
            f"(+{row['vs_dense']['delta_nll']:.4f} ± {row['vs_dense']['delta_nll_stderr']:.4f} vs dense)")
    if "vs_baseline" in row:
        b = row["vs_baseline"]
        text += f", {b['delta_nll']:+.4f} ± {b['delta_nll_stderr']:.4f} vs {b['baseline']}"
    return text


def markdown_table(report: dict) -> str:
    """The README table: one line per row, deltas with their paired standard errors."""
    dense = report["dense"]
    lines = ["| pattern | method | calib. seed | NLL (nats/token) | PPL | Δ vs dense (± s.e.) | Δ vs baseline (± s.e.) |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| dense | - | - | {dense['nll']:.4f} | {dense['perplexity']:.2f} | - | - |"]
    for row in report["rows"]:
        base = row.get("vs_baseline")
        base_text = f"{base['delta_nll']:+.4f} ± {base['delta_nll_stderr']:.4f} (vs {base['baseline']})" if base else "-"
        seed = "-" if row["method"] == "magnitude" else str(row["calibration_seed"])
        lines.append(f"| {row['pattern']} | {row['method']} | {seed} | {row['nll']:.4f} | {row['perplexity']:.2f} | "
                     f"{row['vs_dense']['delta_nll']:+.4f} ± {row['vs_dense']['delta_nll_stderr']:.4f} | {base_text} |")
    return "\n".join(lines) + "\n"
