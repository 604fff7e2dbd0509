"""`sinkprune eval`: NLL / perplexity of models on the same held-out masks, paired."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkprune.cli_args import add_unverified_flag, device, existing_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="masked-diffusion NLL of one or more models; later ones paired with the first")
    p.add_argument("--model", action="append", required=True, help="repeat: the first is the baseline")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16, help="Monte-Carlo samples per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", nargs="*", default=None, type=existing_file, help="local text files (default: the shipped evaluation split)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--device", default="cpu", type=device)
    add_unverified_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.dlm.loading import ModelLoadError, load_model
    from sinkprune.evaluate import compare_models, text_windows

    if args.windows < 2 or args.samples < 1:
        raise UsageError("--windows must be >= 2 and --samples >= 1")
    try:
        loaded = {name: load_model(name, device=args.device, allow_unverified=args.unverified) for name in args.model}
    except ModelLoadError as err:
        raise UsageError(str(err)) from err
    tokenizer = next(iter(loaded.values()))[1]
    windows = text_windows(tokenizer, count=args.windows, seq_len=args.seq_len, files=args.text)
    report = compare_models({name: model for name, (model, _) in loaded.items()}, windows,
                            args.samples, args.seed, progress=True)
    baseline = args.model[0]
    for name, entry in report.items():
        line = f"{name}: nll {entry['nll']:.4f} ± {entry['nll_stderr']:.4f}  ppl {entry['perplexity']:.2f}"
        if name != baseline:
            delta = entry["vs_" + baseline]
            line += f"  delta {delta['delta_nll']:+.4f} ± {delta['delta_nll_stderr']:.4f} (paired)"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
