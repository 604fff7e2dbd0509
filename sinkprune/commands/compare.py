"""`sinkprune compare`: prune with every method and pattern, score all on the same masks."""
from __future__ import annotations

import argparse
import json

from sinkprune.cli_args import COUNT, SEED, SEQ_LEN, add_unverified_flag, device, integer, nonempty_path, output_dir
from sinkprune.compute_dtype import CHOICES as DTYPE_CHOICES
from sinkprune.prune import CALIBRATIONS, METHODS, SINK_WEIGHTINGS
from sinkprune.safe_output import add_overwrite_flag

WRITES = ("compare.json", "compare.md")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="table of NLL for every pruning method x pattern, paired with dense")
    p.add_argument("--model", default="embedded", type=nonempty_path)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--patterns", default="unstructured:0.5,2:4")
    p.add_argument("--calibration-seeds", default="0,1",
                   help=f"calibration draws (different windows and noise): comma-separated seeds, each in {SEED}")
    p.add_argument("--calibration-windows", type=COUNT, default=128)
    p.add_argument("--eval-windows", type=COUNT, default=64)
    p.add_argument("--eval-samples", type=COUNT, default=16)
    p.add_argument("--seq-len", type=SEQ_LEN, default=256, help="at most the model's maximum sequence length")
    p.add_argument("--diffusion-steps", type=integer(1, 10_000), default=50)
    p.add_argument("--every", type=integer(1, 10_000), default=5)
    p.add_argument("--calibrations", default="clean,noised",
                   help="calibration inputs to run every method with: clean (the reference's baselines) and/or "
                        "noised; sink-aware rows are paired with both the same-calibration and the clean baseline")
    p.add_argument("--extra-sink-weightings", default="per-timestep",
                   help="sink-aware methods on noised windows also run with these weightings (empty: none)")
    p.add_argument("--calibration-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="as for prune: auto is the stored dtype unless float32 multiplies faster on this device")
    p.add_argument("--out-dir", default="runs/compare", type=output_dir)
    p.add_argument("--device", default="cpu", type=device)
    add_overwrite_flag(p)
    add_unverified_flag(p)
    p.set_defaults(func=run)


def _calibration_draw(pool, windows: int, seed: int):
    """A different random subset of the calibration windows for each seed."""
    import torch

    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:windows]]


def parse_seeds(spec: str) -> list[int]:
    """`--calibration-seeds`: distinct integers in the seed range, at least one."""
    from sinkprune.cli import UsageError

    try:
        seeds = [SEED(s) for s in spec.split(",") if s.strip()]
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--calibration-seeds {spec!r}: {err}") from None
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > 100:
        raise UsageError(f"--calibration-seeds {spec!r}: give 1 to 100 distinct seeds, comma-separated")
    return seeds


def run(args: argparse.Namespace) -> int:
    from sinkprune.calibration import default_timesteps, prunable_linears
    from sinkprune.cli import UsageError, check_length, check_windows, model_config
    from sinkprune.compare import CompareSettings, choice_text, markdown_table, run_comparison
    from sinkprune.compute_dtype import stored_and_calibration_dtype
    from sinkprune.dlm.loading import ModelLoadError, load_model, resolve_model_dir
    from sinkprune.evaluate import text_windows
    from sinkprune.masks import check_pattern_fits, parse_pattern
    from sinkprune.safe_output import check_output, staged_output

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    calibrations = [c for c in args.calibrations.split(",") if c]
    weightings = [w for w in args.extra_sink_weightings.split(",") if w]
    if not calibrations or set(calibrations) - set(CALIBRATIONS) or set(weightings) - set(SINK_WEIGHTINGS):
        raise UsageError(f"--calibrations: choose from {', '.join(CALIBRATIONS)}; "
                         f"--extra-sink-weightings from {', '.join(SINK_WEIGHTINGS)}")
    if args.diffusion_steps < args.every:
        raise UsageError(f"--diffusion-steps {args.diffusion_steps} must be at least --every {args.every}")
    patterns = [p for p in args.patterns.split(",") if p]
    seeds = parse_seeds(args.calibration_seeds)
    try:
        parsed = [parse_pattern(pattern) for pattern in patterns]
        if not parsed:
            raise UsageError(f"--patterns {args.patterns!r} names no pattern")
        source = resolve_model_dir(args.model)
        check_output(args.out_dir, args.overwrite, [source], ours=WRITES)
        check_length("--seq-len", args.seq_len, model_config(args.model), args.model)
        _, compute = stored_and_calibration_dtype(source, args.device, args.calibration_dtype)
        model, tokenizer = load_model(source, device=args.device, dtype=compute, allow_unverified=args.unverified)
        for pattern in parsed:
            check_pattern_fits(pattern, prunable_linears(model))
    except (ValueError, ModelLoadError) as err:
        raise UsageError(str(err)) from err
    settings = CompareSettings(methods, patterns, seeds, default_timesteps(args.diffusion_steps, args.every),
                               args.eval_samples, calibrations=calibrations, extra_sink_weightings=weightings)
    try:
        pool = text_windows(tokenizer, "calibration", count=None, seq_len=args.seq_len)
        eval_windows = text_windows(tokenizer, "evaluation", args.eval_windows, args.seq_len)
    except ValueError as err:  # text too short for one window
        raise UsageError(f"--seq-len {args.seq_len}: {err}") from err
    check_windows("--calibration-windows", args.calibration_windows, len(pool), "the calibration split", args.seq_len)
    check_windows("--eval-windows", args.eval_windows, len(eval_windows), "the evaluation split", args.seq_len)
    calibration = {seed: _calibration_draw(pool, args.calibration_windows, seed) for seed in seeds}
    report = run_comparison(model, calibration, eval_windows, settings)
    report["settings"] |= {"model": str(args.model), "calibration_windows": args.calibration_windows,
                           "eval_windows": len(eval_windows), "seq_len": args.seq_len,
                           "calibration_dtype": str(compute).replace("torch.", "")}
    table = markdown_table(report)
    with staged_output(args.out_dir, args.overwrite, [source], ours=WRITES) as out:
        (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "compare.md").write_text(table + "\n" + choice_text(report))
    print(table)
    print(f"wrote compare.json and compare.md to {args.out_dir}")
    print(choice_text(report), end="")
    return 0
