"""`sinkprune eval`: NLL / perplexity of models on the same held-out masks, paired."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkprune.cli_args import (COUNT, SEED, SEQ_LEN, add_unverified_flag, device, existing_file, integer,
                                nonempty_path, output_file)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="masked-diffusion NLL of one or more models; later ones paired with the first")
    p.add_argument("--model", action="append", required=True, type=nonempty_path,
                   help="repeat: the first is the baseline")
    p.add_argument("--windows", type=integer(2, 1_000_000), default=64)
    p.add_argument("--seq-len", type=SEQ_LEN, default=256, help="at most every model's maximum sequence length")
    p.add_argument("--samples", type=COUNT, default=16, help="Monte-Carlo samples per window")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--text", nargs="*", default=None, type=existing_file, help="local text files (default: the shipped evaluation split)")
    p.add_argument("--out", default=None, type=output_file, help="write the report as JSON here (a file)")
    p.add_argument("--device", default="cpu", type=device)
    add_unverified_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError, check_length, check_windows, model_config
    from sinkprune.dlm.loading import ModelLoadError, load_model
    from sinkprune.evaluate import compare_models, text_windows

    try:
        for name in args.model:
            check_length("--seq-len", args.seq_len, model_config(name), name)
        loaded = {name: load_model(name, device=args.device, allow_unverified=args.unverified) for name in args.model}
    except ModelLoadError as err:
        raise UsageError(str(err)) from err
    tokenizer = next(iter(loaded.values()))[1]
    try:
        windows = text_windows(tokenizer, count=args.windows, seq_len=args.seq_len, files=args.text)
    except ValueError as err:  # text too short for one window
        raise UsageError(f"--seq-len {args.seq_len}: {err}") from err
    check_windows("--windows", args.windows, len(windows), "the --text files" if args.text else "the evaluation split",
                  args.seq_len)
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
