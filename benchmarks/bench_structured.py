"""`python -m benchmarks.bench_structured`: how much faster a structurally pruned model
runs on this machine's CPU, and what it costs in quality (paired NLL).

Forward passes are timed side by side in one process after warm-up (median of
repeats); the quality is scored on the same evaluation windows and masks."""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from sinkprune.calibration import default_timesteps
from sinkprune.dlm.loading import load_model
from sinkprune.evaluate import compare_models, text_windows
from sinkprune.prune import PruneSettings, prune_model


def time_forward(model, ids: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(ids)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--method", default="sink-wanda", choices=("magnitude", "wanda", "sink-wanda"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--out", default="runs/bench_structured.json")
    args = parser.parse_args(argv)
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    pruned = copy.deepcopy(dense)
    windows = text_windows(tokenizer, "calibration", args.calibration_windows, args.seq_len)
    prune_model(pruned, PruneSettings(args.method, f"structured:{args.ratio}", default_timesteps()), windows)
    ids = text_windows(tokenizer, "evaluation", args.batch, args.seq_len)
    dense_s, pruned_s = time_forward(dense, ids, args.repeats), time_forward(pruned, ids, args.repeats)
    quality = compare_models({"dense": dense, "structured": pruned},
                             text_windows(tokenizer, "evaluation", args.eval_windows, args.seq_len), args.eval_samples)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {"model": args.model, "method": args.method, "ratio": args.ratio, "batch": args.batch,
              "seq_len": args.seq_len, "dense_forward_s": dense_s, "structured_forward_s": pruned_s,
              "speedup": dense_s / pruned_s, "dense_parameters": count(dense), "structured_parameters": count(pruned),
              "quality": quality, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "date": date.today().isoformat()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    delta = quality["structured"]["vs_dense"]
    print(f"forward ({args.batch}x{args.seq_len}, fp32, {torch.get_num_threads()} threads): dense {dense_s * 1000:.1f} ms, "
          f"structured:{args.ratio} {pruned_s * 1000:.1f} ms -> {result['speedup']:.2f}x; parameters "
          f"{result['dense_parameters']:,} -> {result['structured_parameters']:,}")
    print(f"quality: NLL {quality['dense']['nll']:.3f} -> {quality['structured']['nll']:.3f} "
          f"({delta['delta_nll']:+.3f} ± {delta['delta_nll_stderr']:.3f}, paired); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
