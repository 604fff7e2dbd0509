"""The pruning comparison: every method x pattern x calibration x calibration draw,
scored on the same evaluation masks as the dense model (paired), with each
sink-aware method also paired against its own baseline at matched sparsity:
the baseline calibrated like it, and the reference-style baseline (calibrated
on clean windows, as VILA-Lab/Sink-Aware-Pruning calibrates the Wanda and
SparseGPT it compares against), so each delta says what the paper's does."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from sinkprune.choice import choose
from sinkprune.dlm.likelihood import LikelihoodResult, estimate_nll, paired_difference
from sinkprune.prune import PruneSettings, prune_model
from sinkprune.sink_scores import timestep_sink_scores

BASELINE_OF = {"sink-wanda": "wanda", "sink-sparsegpt": "sparsegpt"}
REFERENCE_CALIBRATION = "clean"


@dataclass
class CompareSettings:
    methods: list[str]
    patterns: list[str]
    calibration_seeds: list[int]
    timesteps: list[float]
    eval_samples: int = 16
    eval_seed: int = 0
    calibrations: list[str] = field(default_factory=lambda: ["noised"])
    # sink-aware methods on noised windows are also run with these extra weightings ("per-timestep")
    extra_sink_weightings: list[str] = field(default_factory=list)


def _variants(settings: CompareSettings, method: str, calibration: str) -> list[str]:
    """The sink weightings a (method, calibration) row is run with."""
    if not method.startswith("sink-") or calibration != "noised":
        return ["mean"]
    return ["mean", *settings.extra_sink_weightings]


def run_comparison(dense, calibration: dict[int, torch.Tensor], eval_windows: torch.Tensor,
                   settings: CompareSettings, progress: bool = True) -> dict:
    """`calibration` maps each calibration seed to its windows. Returns a report dict
    with one row per (pattern, seed, calibration, method, sink weighting) and the dense reference."""
    score = lambda model: estimate_nll(model, eval_windows, settings.eval_samples, settings.eval_seed)  # noqa: E731
    dense_result = score(dense)
    rows = []
    results: dict[tuple, LikelihoodResult] = {}
    sink_scores: dict[int, torch.Tensor] = {}  # per seed: every sink-aware row of a draw uses the same scores
    calibrations = sorted(settings.calibrations, key=lambda c: c != REFERENCE_CALIBRATION)  # reference baselines first
    for pattern in settings.patterns:
        for seed in settings.calibration_seeds:
            for inputs in calibrations:
                for method in settings.methods:
                    if method == "magnitude" and (seed, inputs) != (settings.calibration_seeds[0], calibrations[0]):
                        continue  # magnitude pruning uses no calibration data
                    for weighting in _variants(settings, method, inputs):
                        if method.startswith("sink-") and seed not in sink_scores:
                            sink_scores[seed] = timestep_sink_scores(dense, calibration[seed], settings.timesteps, seed)
                        row = _row(dense, dense_result, calibration[seed], sink_scores.get(seed), score, results,
                                   settings, pattern, seed, inputs, method, weighting)
                        rows.append(row)
                        if progress:
                            print(_line(row), flush=True)
    report = {"dense": dense_result.to_dict(), "rows": rows, "settings": settings.__dict__}
    report["choice"] = {pattern: choice.to_dict() for pattern, choice in choose(report).items()}
    return report


def _row(dense, dense_result, windows, scores, score, results, settings, pattern, seed, inputs, method,
         weighting) -> dict:
    began = time.perf_counter()
    model = copy.deepcopy(dense)
    prune_model(model, PruneSettings(method, pattern, settings.timesteps, seed, calibration=inputs,
                                     sink_weighting=weighting), windows,
                sink_scores=scores if method.startswith("sink-") else None)
    result = score(model)
    results[(pattern, seed, inputs, method, weighting)] = result
    row = {"pattern": pattern, "method": method, "calibration": "-" if method == "magnitude" else inputs,
           "sink_weighting": weighting if method.startswith("sink-") else "-", "calibration_seed": seed,
           **result.to_dict(), "vs_dense": paired_difference(dense_result, result).to_dict(),
           "seconds": round(time.perf_counter() - began, 1)}
    base = BASELINE_OF.get(method)
    for key, base_inputs in (("vs_baseline", inputs), ("vs_reference_baseline", REFERENCE_CALIBRATION)):
        baseline = results.get((pattern, seed, base_inputs, base, "mean"))
        if baseline is not None and not (key == "vs_reference_baseline" and base_inputs == inputs):
            row[key] = {"baseline": base, "calibration": base_inputs, **paired_difference(baseline, result).to_dict()}
    return row


def _label(row: dict) -> str:
    return row["method"] + (" (per-timestep)" if row["sink_weighting"] == "per-timestep" else "")


def _line(row: dict) -> str:
    text = (f"{row['pattern']:>16} {_label(row):>30} {row['calibration']:>6} seed {row['calibration_seed']}: "
            f"nll {row['nll']:.4f} (+{row['vs_dense']['delta_nll']:.4f} ± {row['vs_dense']['delta_nll_stderr']:.4f} "
            f"vs dense)")
    for key in ("vs_baseline", "vs_reference_baseline"):
        if key in row:
            b = row[key]
            text += f", {b['delta_nll']:+.4f} ± {b['delta_nll_stderr']:.4f} vs {b['baseline']} ({b['calibration']})"
    return text


def _delta(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['delta_nll']:+.4f} ± {entry['delta_nll_stderr']:.4f} (vs {entry['baseline']}, {entry['calibration']})"


def markdown_table(report: dict) -> str:
    """The README table: one line per row, deltas with their paired standard errors."""
    dense = report["dense"]
    lines = ["| pattern | method | calibration | calib. seed | NLL (nats/token) | PPL | Δ vs dense (± s.e.) "
             "| Δ vs baseline, same calibration (± s.e.) | Δ vs reference baseline, clean (± s.e.) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| dense | - | - | - | {dense['nll']:.4f} | {dense['perplexity']:.2f} | - | - | - |"]
    for row in report["rows"]:
        seed = "-" if row["method"] == "magnitude" else str(row["calibration_seed"])
        lines.append(f"| {row['pattern']} | {_label(row)} | {row['calibration']} | {seed} | {row['nll']:.4f} | "
                     f"{row['perplexity']:.2f} | {row['vs_dense']['delta_nll']:+.4f} ± "
                     f"{row['vs_dense']['delta_nll_stderr']:.4f} | {_delta(row.get('vs_baseline'))} | "
                     f"{_delta(row.get('vs_reference_baseline'))} |")
    return "\n".join(lines) + "\n"


def choice_text(report: dict) -> str:
    """What `sinkprune prune --method auto` would take for each pattern of this report, and why
    (`sinkprune.choice.choose`: the lowest mean gap to dense over the calibration draws)."""
    lines = ["The choice (lowest mean NLL gap to dense over the calibration draws):"]
    lines += [f"- {choice.describe()}" for choice in choose(report).values()]
    return "\n".join(lines) + "\n"
