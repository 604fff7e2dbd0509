"""`sinkprune ship`: package a finished training run as the embedded default model."""
from __future__ import annotations

import argparse
from pathlib import Path

from sinkprune.cli_args import COUNT, existing_file, nonempty_path, output_dir
from sinkprune.dlm.loading import embedded_model_dir
from sinkprune.safe_output import add_overwrite_flag

CARD_FILES = ("card.json", "README.md")  # written beside the model directory (save_model's files)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ship", help="package a trained run as the embedded model, with a measured model card")
    p.add_argument("--run", default="runs/train", type=nonempty_path, help="a finished `sinkprune train` run directory")
    p.add_argument("--out-dir", default=str(embedded_model_dir()), type=output_dir,
                   help="replacing the shipped model needs --overwrite")
    p.add_argument("--eval-windows", type=COUNT, default=64)
    p.add_argument("--samples", type=COUNT, default=16)
    p.add_argument("--compare", default=None, type=existing_file, help="a compare.json from `sinkprune compare` to include")
    add_overwrite_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.dlm.loading import saved_model_names
    from sinkprune.safe_output import staged_output
    from sinkprune.ship import ship

    if not (Path(args.run) / "final" / "config.json").is_file():
        raise UsageError(f"{args.run} has no final/ model: the training run has not finished")
    try:
        ours = [*saved_model_names(args.out_dir), *CARD_FILES]
        with staged_output(args.out_dir, args.overwrite, [args.run], ours=ours) as staging:
            card = ship(args.run, staging, args.eval_windows, args.samples, compare_report=args.compare)
    except ValueError as err:  # a model that does not load, too many windows asked
        raise UsageError(str(err)) from err
    ev = card["evaluation"]
    print(f"shipped {card['parameters']:,} parameters to {args.out_dir}: eval NLL {ev['shipped']['nll']:.3f} "
          f"(untrained {ev['untrained']['nll']:.3f})")
    return 0
