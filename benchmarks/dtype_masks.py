"""`python -m benchmarks.dtype_masks`: how much the calibration dtype changes the result.

Prunes the same model with the same settings twice, calibrating in float32 and
in bfloat16, then reports the share of weights whose keep/prune decision
differs (per layer and overall) and the quality of both, paired on the same
evaluation masks, so a faster calibration dtype can be chosen knowing its cost.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

from sinkprune.calibration import default_timesteps, prunable_linears
from sinkprune.dlm.likelihood import estimate_nll, paired_difference
from sinkprune.dlm.loading import load_model
from sinkprune.evaluate import paired_report, text_windows
from sinkprune.prune import CALIBRATIONS, METHODS, PruneSettings, prune_model

DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dtype_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--method", choices=METHODS, default="sink-wanda")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calibration", choices=("auto", *CALIBRATIONS), default="auto")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/dtype_masks.json"))
    args = parser.parse_args(argv)

    settings = PruneSettings(args.method, args.pattern, default_timesteps(50, args.every), calibration=args.calibration)
    masks, results = {}, {}
    for name in DTYPES:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, name))
        windows = text_windows(tokenizer, "calibration", args.calibration_windows)
        scored = text_windows(tokenizer, "evaluation", args.eval_windows)
        if not results:
            results["dense"] = estimate_nll(model, scored, args.eval_samples, progress=True)
        prune_model(model, settings, windows, progress=True)
        masks[name] = {layer: linear.weight != 0 for layer, linear in prunable_linears(model).items()}
        results[name] = estimate_nll(model.float(), scored, args.eval_samples, progress=True)
    differing = {layer: float((masks["float32"][layer] != masks["bfloat16"][layer]).float().mean())
                 for layer in masks["float32"]}
    total = sum(int((masks["float32"][n] != masks["bfloat16"][n]).sum()) for n in differing)
    weights = sum(m.numel() for m in masks["float32"].values())
    report = {"benchmark": "dtype_masks", "date": date.today().isoformat(),
              "command": " ".join(["python -m benchmarks.dtype_masks", *(sys.argv[1:] if argv is None else argv)]),
              "settings": settings.to_dict(), "calibration_windows": args.calibration_windows,
              "differing_share": total / weights, "differing_share_per_layer": differing,
              "quality": paired_report(results),
              "bfloat16_vs_float32": paired_difference(results["float32"], results["bfloat16"]).to_dict()}
    print(f"keep/prune decisions differing between float32 and bfloat16 calibration: {total / weights:.2%} "
          f"(layers {min(differing.values()):.2%} .. {max(differing.values()):.2%})")
    for name in DTYPES:
        q = report["quality"][name]
        print(f"{name}: NLL {q['nll']:.4f} ({q['vs_dense']['delta_nll']:+.4f} ± {q['vs_dense']['delta_nll_stderr']:.4f} "
              f"vs dense)")
    delta = report["bfloat16_vs_float32"]
    print(f"bfloat16 - float32: {delta['delta_nll']:+.4f} ± {delta['delta_nll_stderr']:.4f} nats/token (paired)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
