"""`sinkprune prune`: prune a model's linear layers and save the result."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkprune.prune import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude or Wanda; N:M or unstructured)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--method", choices=METHODS, default="wanda")
    p.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8) or unstructured:<ratio>")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--calibration-windows", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.calibration import default_timesteps, input_square_sums
    from sinkprune.cli import UsageError
    from sinkprune.dlm.loading import ModelLoadError, load_model, save_model
    from sinkprune.evaluate import text_windows
    from sinkprune.masks import parse_pattern
    from sinkprune.prune import prune_model

    try:
        pattern = parse_pattern(args.pattern)
        model, tokenizer = load_model(args.model, device=args.device)
    except (ValueError, ModelLoadError) as err:
        raise UsageError(str(err)) from err
    timesteps = default_timesteps()
    sums = None
    if args.method != "magnitude":
        windows = text_windows(tokenizer, "calibration", args.calibration_windows, args.seq_len)
        sums = input_square_sums(model, windows, timesteps, args.seed, progress=True)
    sparsity = prune_model(model, args.method, pattern, sums)
    out = save_model(model, args.out_dir, tokenizer=tokenizer)
    manifest = {"base_model": str(args.model), "method": args.method, "pattern": str(pattern),
                "sparsity": sum(sparsity.values()) / len(sparsity), "per_layer_sparsity": sparsity,
                "calibration": {"windows": args.calibration_windows, "seq_len": args.seq_len,
                                "timesteps": timesteps, "seed": args.seed}}
    (Path(out) / "sinkprune.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"pruned {len(sparsity)} linear layers to {manifest['sparsity']:.1%} ({pattern}, {args.method}) -> {out}")
    return 0
