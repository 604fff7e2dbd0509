"""`sinkprune ship`: package a finished training run as the embedded default model."""
from __future__ import annotations

import argparse
from pathlib import Path

from sinkprune.cli_args import existing_file
from sinkprune.dlm.loading import embedded_model_dir
from sinkprune.safe_output import add_overwrite_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ship", help="package a trained run as the embedded model, with a measured model card")
    p.add_argument("--run", default="runs/train", help="a finished `sinkprune train` run directory")
    p.add_argument("--out-dir", default=str(embedded_model_dir()),
                   help="replacing the shipped model needs --overwrite")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--compare", default=None, type=existing_file, help="a compare.json from `sinkprune compare` to include")
    add_overwrite_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.safe_output import staged_output
    from sinkprune.ship import ship

    if not (Path(args.run) / "final" / "config.json").is_file():
        raise UsageError(f"{args.run} has no final/ model: the training run has not finished")
    with staged_output(args.out_dir, args.overwrite, [args.run]) as staging:
        card = ship(args.run, staging, args.eval_windows, args.samples, compare_report=args.compare)
    ev = card["evaluation"]
    print(f"shipped {card['parameters']:,} parameters to {args.out_dir}: eval NLL {ev['shipped']['nll']:.3f} "
          f"(untrained {ev['untrained']['nll']:.3f})")
    return 0
