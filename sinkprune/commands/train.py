"""`sinkprune train`: train a LLaDA-architecture masked-diffusion LM from scratch."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sinkprune.cli_args import SEED, device, existing_dir, existing_file, integer, number, output_dir
from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a small masked-diffusion LM (the embedded default) from scratch")
    p.add_argument("--out-dir", default="runs/train", type=output_dir,
                   help="checkpoints, log and final model; a run there is resumed, any other content refused")
    p.add_argument("--train", default=None, type=existing_file, help="training text (default: runs/corpus/train.txt, see build-corpus)")
    p.add_argument("--tokenizer", default=str(PACKAGE_TOKENIZER_DIR), type=existing_dir)
    p.add_argument("--d-model", type=integer(2, 65536), default=384,
                   help="divisible by --heads, into an even head size")
    p.add_argument("--layers", type=integer(1, 1024), default=6)
    p.add_argument("--heads", type=integer(1, 1024), default=6)
    p.add_argument("--mlp-hidden", type=integer(1, 1_048_576), default=1024)
    p.add_argument("--seq-len", type=integer(2, 65536), default=256)
    p.add_argument("--steps", type=integer(1, 100_000_000), default=4000)
    p.add_argument("--batch-size", type=integer(1, 65536), default=16)
    p.add_argument("--lr", type=number(0, 10, lo_open=True), default=2e-3)
    p.add_argument("--warmup", type=integer(0, 100_000_000), default=200)
    p.add_argument("--eval-every", type=integer(1, 100_000_000), default=200)
    p.add_argument("--checkpoint-every", type=integer(1, 100_000_000), default=100)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (3x faster on CPUs with AVX512-BF16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-minutes", type=number(0, 1e7, lo_open=True), default=None,
                   help="checkpoint and stop after this long")
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch: replace the out-dir (a run in it is discarded, not resumed)")
    p.set_defaults(func=run)


def _windows(texts_path: str | None, split: str, tokenizer, seq_len: int, cache: Path):
    """Tokenised windows of a split, cached as .npy next to the run."""
    import torch

    from sinkprune.data.corpus import load_split
    from sinkprune.data.windows import make_windows, token_stream

    if not cache.is_file():
        stream = token_stream(load_split(split, texts_path), tokenizer)
        np.save(cache, stream)
    return make_windows(np.load(cache), seq_len, tokenizer.bos_token_id).to(torch.long)


def run(args: argparse.Namespace) -> int:
    from sinkprune.cli import UsageError
    from sinkprune.dlm.config import DLMConfig
    from sinkprune.dlm.loading import load_tokenizer
    from sinkprune.safe_output import check_output, staged_output
    from sinkprune.train import TrainConfig, checkpoint_config, is_run_dir, train

    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if (args.d_model // args.heads) % 2:
        raise UsageError(f"--d-model {args.d_model} / --heads {args.heads} = {args.d_model // args.heads}: the head "
                         "size must be even (rotary embeddings)")
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise UsageError(f"no tokenizer.json in {args.tokenizer} (run `sinkprune train-tokenizer`)")
    tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.out_dir).expanduser()
    sources = [args.tokenizer] + ([args.train] if args.train else [])
    present = [p.name for p in out.iterdir()] if out.is_dir() else []
    # the checks that hold whatever the directory holds (a source, the current directory, home); its content next
    check_output(out, overwrite=True, sources=sources, ours=present)
    if out.exists() and not is_run_dir(out):
        raise UsageError(f"output directory {out} holds files that `sinkprune train` did not write; "
                         "--overwrite replaces only a run of ours: remove them yourself or choose another --out-dir")
    if args.overwrite and out.exists():
        with staged_output(out, overwrite=True, sources=sources, ours=present):
            pass  # the run directory (nothing but a run, checked above) is replaced by an empty one
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_windows = _windows(args.train, "train", tokenizer, args.seq_len, out / "train_tokens.npy")
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    eval_windows = _windows(None, "evaluation", tokenizer, args.seq_len, out / "eval_tokens.npy")
    model_config = DLMConfig.from_hf_config({
        "model_type": "llada", "d_model": args.d_model, "n_heads": args.heads, "n_kv_heads": args.heads,
        "n_layers": args.layers, "mlp_hidden_size": args.mlp_hidden, "vocab_size": len(tokenizer),
        "embedding_size": len(tokenizer), "max_sequence_length": args.seq_len * 4, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "mask_token_id": tokenizer.mask_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    })
    resumed = checkpoint_config(out)
    if resumed is not None and resumed != model_config.to_hf_config():
        raise UsageError(f"{out} holds a run of another model (its checkpoint's config differs from these "
                         "flags); pass the same flags to resume it, --overwrite to start over, or another --out-dir")
    if resumed is not None:
        print(f"train: resuming the run in {out}")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      bf16=args.bf16, compile=args.compile, max_minutes=args.max_minutes,
                      model=model_config.to_hf_config())
    print(f"train: {len(train_windows)} windows of {args.seq_len} tokens, {len(eval_windows)} eval windows")
    summary = train(model_config, train_windows, eval_windows, out, cfg, tokenizer=tokenizer, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0
