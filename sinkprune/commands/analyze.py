"""`sinkprune analyze`: the attention-sink report of a model (JSON + PNG)."""
from __future__ import annotations

import argparse
import json

from sinkprune.cli_args import (COUNT, SEED, SEQ_LEN, add_unverified_flag, device, existing_file, nonempty_path,
                                output_dir)
from sinkprune.safe_output import add_overwrite_flag

WRITES = ("sinks.json", "sinks.png", "sinks_causal.json", "sinks_causal.png")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="attention sinks over the denoising trajectory (JSON + PNG)")
    p.add_argument("--model", default="embedded", type=nonempty_path)
    p.add_argument("--out-dir", default="runs/sinks", type=output_dir)
    p.add_argument("--windows", type=COUNT, default=32, help="evaluation windows to analyse")
    p.add_argument("--seq-len", type=SEQ_LEN, default=256, help="at most the model's maximum sequence length")
    p.add_argument("--timesteps", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated t in (0, 1]")
    p.add_argument("--text", nargs="*", default=None, type=existing_file, help="local text files (default: the shipped evaluation split)")
    p.add_argument("--causal", action="store_true",
                   help="also run the same model with a causal mask: the AR-style comparison")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu", type=device)
    add_overwrite_flag(p)
    add_unverified_flag(p)
    p.set_defaults(func=run)


def parse_timesteps(spec: str) -> list[float]:
    from sinkprune.cli import UsageError

    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as err:
        raise UsageError(f"--timesteps: not a comma-separated list of numbers: {spec!r}") from err
    if not values or len(values) > 1000 or any(not 0 < v <= 1 for v in values):
        raise UsageError(f"--timesteps: 1 to 1000 values, every t in (0, 1], got {spec!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError, check_length, model_config
    from sinkprune.data.corpus import load_split, load_text_files
    from sinkprune.dlm.loading import ModelLoadError, load_model, resolve_model_dir
    from sinkprune.safe_output import staged_output

    timesteps = parse_timesteps(args.timesteps)
    try:
        source = resolve_model_dir(args.model)
        check_length("--seq-len", args.seq_len, model_config(args.model), args.model)
        with staged_output(args.out_dir, args.overwrite, [source], ours=WRITES) as staging:
            model, tokenizer = load_model(source, device=args.device, allow_unverified=args.unverified)
            documents = load_text_files(args.text) if args.text else load_split("evaluation")
            _analyze(args, model, tokenizer, documents, timesteps, staging)
    except (ModelLoadError, OSError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {args.out_dir}")
    return 0


def _analyze(args, model, tokenizer, documents, timesteps, out) -> None:
    from sinkprune.cli import UsageError, check_windows
    from sinkprune.data.windows import make_windows, token_stream
    from sinkprune.sinks import collect_attention_mass, plot_mass, summarize

    try:
        windows = make_windows(token_stream(documents, tokenizer), args.seq_len, tokenizer.bos_token_id, args.windows)
    except ValueError as err:  # text too short for one window
        raise UsageError(f"--seq-len {args.seq_len}: {err}") from err
    check_windows("--windows", args.windows, len(windows), "the --text files" if args.text else "the evaluation split", args.seq_len)
    for suffix, causal in [("", False)] + ([("_causal", True)] if args.causal else []):
        mass = collect_attention_mass(model, windows, timesteps, args.seed, progress=True, causal=causal)
        report = summarize(mass, timesteps) | {"model": str(args.model), "seed": args.seed, "causal": causal}
        (out / f"sinks{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
        plot = plot_mass(mass, timesteps, out / f"sinks{suffix}.png")
        print("causal (AR-style) attention:" if causal else "bidirectional (DLM) attention:")
        for layer in report["layers"]:
            steps = layer["by_timestep"]
            print(f"  layer {layer['layer']}: dominant position {[s['most_common_dominant_position'] for s in steps]}"
                  f" at t={timesteps}, share {[round(s['dominant_share_mean'], 3) for s in steps]}, "
                  f"moves in {layer['windows_where_dominant_moves']:.0%} of windows, "
                  f"normalised variance {layer['dominant_position_variance_norm']:.4f}")
        print(f"{'sinks' + suffix}.json and {plot.name} done")
