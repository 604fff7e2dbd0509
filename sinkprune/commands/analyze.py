"""`sinkprune analyze`: the attention-sink report of a model (JSON + PNG)."""
from __future__ import annotations

import argparse
import json

from sinkprune.cli_args import add_unverified_flag, device, existing_file
from sinkprune.safe_output import add_overwrite_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="attention sinks over the denoising trajectory (JSON + PNG)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--out-dir", default="runs/sinks")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows to analyse")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--timesteps", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated t in (0, 1]")
    p.add_argument("--text", nargs="*", default=None, type=existing_file, help="local text files (default: the shipped evaluation split)")
    p.add_argument("--causal", action="store_true",
                   help="also run the same model with a causal mask: the AR-style comparison")
    p.add_argument("--seed", type=int, default=0)
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
    if not values or any(not 0 < v <= 1 for v in values):
        raise UsageError(f"--timesteps: every t must be in (0, 1], got {spec!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.data.corpus import load_split, load_text_files
    from sinkprune.dlm.loading import ModelLoadError, load_model, resolve_model_dir
    from sinkprune.safe_output import staged_output

    timesteps = parse_timesteps(args.timesteps)
    if args.windows < 1 or args.seq_len < 2:
        raise UsageError("--windows must be >= 1 and --seq-len >= 2")
    try:
        source = resolve_model_dir(args.model)
        with staged_output(args.out_dir, args.overwrite, [source]) as staging:
            model, tokenizer = load_model(source, device=args.device, allow_unverified=args.unverified)
            documents = load_text_files(args.text) if args.text else load_split("evaluation")
            _analyze(args, model, tokenizer, documents, timesteps, staging)
    except (ModelLoadError, OSError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {args.out_dir}")
    return 0


def _analyze(args, model, tokenizer, documents, timesteps, out) -> None:
    from sinkprune.data.windows import make_windows, token_stream
    from sinkprune.sinks import collect_attention_mass, plot_mass, summarize

    windows = make_windows(token_stream(documents, tokenizer), args.seq_len, tokenizer.bos_token_id, args.windows)
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
