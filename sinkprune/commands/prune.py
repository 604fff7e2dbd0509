"""`sinkprune prune`: prune a model and write the artifact that `serve` loads."""
from __future__ import annotations

import argparse

from sinkprune.cli_args import (COUNT, SEED, SEQ_LEN, add_unverified_flag, device, existing_dir, integer,
                                nonempty_path, number, output_dir)
from sinkprune.compute_dtype import CHOICES as DTYPE_CHOICES
from sinkprune.hidden_store import PLACES
from sinkprune.prune import AUTO_METHOD, CALIBRATIONS, METHODS, SINK_WEIGHTINGS
from sinkprune.safe_output import add_overwrite_flag
from sinkprune.sink_scores import DEFAULT_ALPHA, DEFAULT_K


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, wanda, sparsegpt, sink-wanda, sink-sparsegpt)")
    p.add_argument("--model", default="embedded", type=nonempty_path)
    p.add_argument("--method", choices=(AUTO_METHOD, *METHODS), default=AUTO_METHOD,
                   help="auto: the method (and calibration) the project's comparison measured best for the pattern: "
                        "sink-sparsegpt on noised windows for N:M and unstructured, sink-wanda for structured "
                        "(README, sinkprune.choice)")
    p.add_argument("--pattern", default="2:4",
                   help="N:M (2:4, 4:8), unstructured:<ratio> or structured:<ratio> (channels and heads)")
    p.add_argument("--out-dir", required=True, type=output_dir,
                   help="the artifact; must be new or empty (or --overwrite, over a previous artifact)")
    add_overwrite_flag(p)
    add_unverified_flag(p)
    p.add_argument("--calibration-windows", type=COUNT, default=128)
    p.add_argument("--seq-len", type=SEQ_LEN, default=256, help="at most the model's maximum sequence length")
    p.add_argument("--diffusion-steps", type=integer(1, 10_000), default=50,
                   help="timestep grid: t = 1 - i / steps ...")
    p.add_argument("--every", type=integer(1, 10_000), default=5, help="... for i = 0, every, 2 * every, ...")
    p.add_argument("--k", type=number(0, 100), default=DEFAULT_K, help="sink threshold in standard deviations")
    p.add_argument("--alpha", type=number(0, 1000, lo_open=True), default=DEFAULT_ALPHA,
                   help="sink sigmoid sharpness")
    p.add_argument("--calibration", choices=("auto", *CALIBRATIONS), default="auto",
                   help="windows the statistics are gathered on: clean (the reference's) or noised at every timestep "
                        "(sink scores always come from noised windows); auto: clean for magnitude and (sink-)wanda, "
                        "noised for (sink-)sparsegpt, the better of each on the embedded model at 2:4 (README)")
    p.add_argument("--sink-weighting", choices=SINK_WEIGHTINGS, default="mean",
                   help="sink-aware methods: the score averaged over timesteps, or each noised window weighted by "
                        "its own timestep's score (the reference's sink-aware Wanda; needs --calibration noised)")
    p.add_argument("--calibration-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the model is calibrated in; auto: the stored dtype unless float32 multiplies faster "
                        "on this device (timed: a CPU without bf16 instructions emulates bf16 several times slower); "
                        "the artifact keeps the stored dtype")
    p.add_argument("--batch-size", type=integer(1, 65536), default=8, help="calibration windows per forward pass")
    p.add_argument("--hidden-states", choices=PLACES, default="device",
                   help="where calibration keeps its hidden states between blocks: device memory, host memory, "
                        "or disk (one batch in memory; for 8B models with many windows, docs/CALIBRATION.md)")
    p.add_argument("--hidden-dir", default=None, type=existing_dir,
                   help="an existing directory for the --hidden-states disk file (default: TMPDIR)")
    p.add_argument("--eval-windows", type=integer(0, 1_000_000), default=32,
                   help="quality check at prune time (0: skip)")
    p.add_argument("--eval-samples", type=COUNT, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: the model's)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu", type=device)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sinkprune.artifact import write_artifact
    from sinkprune.calibration import default_timesteps, prunable_linears
    from sinkprune.calibration_memory import prune_memory
    from sinkprune.cli import UsageError, check_length, check_windows, model_config
    from sinkprune.compute_dtype import stored_and_calibration_dtype
    from sinkprune.dlm.likelihood import estimate_nll
    from sinkprune.dlm.loading import ModelLoadError, load_model, load_tokenizer, resolve_model_dir
    from sinkprune.evaluate import paired_report, text_windows
    from sinkprune.masks import check_pattern_fits, parse_pattern
    from sinkprune.prune import PruneSettings, check_settings, prune_model
    from sinkprune.safe_output import check_output

    if args.diffusion_steps < args.every:
        raise UsageError(f"--diffusion-steps {args.diffusion_steps} must be at least --every {args.every}")
    settings = PruneSettings(args.method, args.pattern, default_timesteps(args.diffusion_steps, args.every),
                             args.seed, args.k, args.alpha, args.batch_size, args.calibration, args.sink_weighting)
    try:
        check_settings(settings)
        pattern = parse_pattern(args.pattern)
        source = resolve_model_dir(args.model)
        check_output(args.out_dir, args.overwrite, [source])
        check_length("--seq-len", args.seq_len, model_config(args.model), args.model)
        tokenizer = load_tokenizer(source)
    except (ValueError, ModelLoadError) as err:
        raise UsageError(str(err)) from err
    try:  # the windows before the weights: too many asked is refused before anything big is read
        windows = text_windows(tokenizer, "calibration", args.calibration_windows, args.seq_len)
        scored = text_windows(tokenizer, "evaluation", args.eval_windows, args.seq_len) if args.eval_windows else None
    except ValueError as err:  # text too short for one window
        raise UsageError(f"--seq-len {args.seq_len}: {err}") from err
    check_windows("--calibration-windows", args.calibration_windows, len(windows), "the calibration split",
                  args.seq_len)
    if scored is not None:
        check_windows("--eval-windows", args.eval_windows, len(scored), "the evaluation split", args.seq_len)
    try:
        stored, compute = stored_and_calibration_dtype(source, args.device, args.calibration_dtype)
        model, _ = load_model(source, device=args.device, dtype=compute, allow_unverified=args.unverified,
                              with_tokenizer=False, progress=True)
        check_pattern_fits(pattern, prunable_linears(model))
    except (ValueError, ModelLoadError) as err:
        raise UsageError(str(err)) from err
    print(f"method: {settings.method}, calibration {settings.calibration}"
          + (f" ({settings.method_choice})" if settings.method_choice else ""))
    print(f"calibrating in {str(compute).replace('torch.', '')} (stored {str(stored).replace('torch.', '')}); "
          + prune_memory(model.config, settings, len(windows), args.seq_len, compute, args.hidden_states).describe())
    # dense quality first, on the same masks as the pruned model later: a paired delta without a second copy
    dense = estimate_nll(model, scored, args.eval_samples, progress=True) if scored is not None else None
    sparsity = prune_model(model, settings, windows, hidden_states=args.hidden_states, hidden_dir=args.hidden_dir,
                           progress=True)
    manifest = {"base_model": str(args.model), **settings.to_dict(),
                "sparsity": sum(sparsity.values()) / len(sparsity), "per_layer_sparsity": sparsity,
                "calibration": {"inputs": settings.calibration, "windows": len(windows), "seq_len": args.seq_len,
                                "split": "calibration", "dtype": str(compute).replace("torch.", "")}}
    if dense is not None:
        pruned = estimate_nll(model, scored, args.eval_samples, progress=True)
        manifest["quality"] = paired_report({"dense": dense, "pruned": pruned})
    out = write_artifact(model, args.out_dir, tokenizer, manifest, dtype=getattr(torch, args.dtype) if args.dtype else stored,
                         source_dir=source, overwrite=args.overwrite, progress=True)
    print(f"pruned {len(sparsity)} linear layers to {manifest['sparsity']:.1%} ({args.pattern}, {settings.method}) -> {out}")
    if dense is not None:
        delta = manifest["quality"]["pruned"]["vs_dense"]
        print(f"quality: NLL {manifest['quality']['pruned']['nll']:.4f} vs dense {manifest['quality']['dense']['nll']:.4f}"
              f" ({delta['delta_nll']:+.4f} ± {delta['delta_nll_stderr']:.4f}, paired)")
    return 0
