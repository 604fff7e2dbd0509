"""`sinkprune ship`: package a finished training run as the embedded default model."""
from __future__ import annotations

import argparse
from pathlib import Path

from sinkprune.dlm.loading import embedded_model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ship", help="package a trained run as the embedded model, with a measured model card")
    p.add_argument("--run", default="runs/train", help="a finished `sinkprune train` run directory")
    p.add_argument("--out-dir", default=str(embedded_model_dir()))
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--compare", default=None, help="a compare.json from `sinkprune compare` to include")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.ship import ship

    if not (Path(args.run) / "final" / "config.json").is_file():
        raise UsageError(f"{args.run} has no final/ model: the training run has not finished")
    card = ship(args.run, args.out_dir, args.eval_windows, args.samples, compare_report=args.compare)
    ev = card["evaluation"]
    print(f"shipped {card['parameters']:,} parameters to {args.out_dir}: eval NLL {ev['shipped']['nll']:.3f} "
          f"(untrained {ev['untrained']['nll']:.3f})")
    return 0
