"""`sinkprune generate`: decode a completion with the reference sampler."""
from __future__ import annotations

import argparse
import time

from sinkprune.cli_args import add_unverified_flag, device
from sinkprune.dlm.decoding import POLICIES

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion from a prompt (LLaDA block decoding)")
    p.add_argument("--model", default="embedded", help="'embedded' or a local HF-layout model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", choices=POLICIES, default="low_confidence")
    p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding threshold")
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                   help="Fast-dLLM's PrefixCache or DualCache (approximations; no --cfg-scale with them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", type=device)
    add_unverified_flag(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's own")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sinkprune.cli import UsageError
    from sinkprune.dlm.generate import generate, validate_schedule
    from sinkprune.dlm.loading import ModelLoadError, load_model
    from sinkprune.dlm.prompt import decode_completion, encode_prompt

    try:
        validate_schedule(args.steps, args.gen_length, args.block_length)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.cache != "none" and args.cfg_scale > 0:
        raise UsageError(f"--cache {args.cache} does not support --cfg-scale > 0")
    try:
        model, tokenizer = load_model(args.model, device=args.device, allow_unverified=args.unverified,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    except ModelLoadError as err:
        raise UsageError(str(err)) from err
    prompt = encode_prompt(tokenizer, args.prompt, model.config)
    began = time.perf_counter()
    out = generate(model, [prompt], steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                   temperature=args.temperature, remasking=args.remasking, threshold=args.threshold,
                   cfg_scale=args.cfg_scale, generator=torch.Generator(device=args.device).manual_seed(args.seed),
                   prefix_cache=args.cache == "prefix", dual_cache=args.cache == "dual")
    seconds = time.perf_counter() - began
    print(args.prompt + decode_completion(tokenizer, out.completions()[0].tolist(), model.config.eos_token_id))
    print(f"[{out.forward_passes} forward passes, {seconds:.2f} s]", flush=True)
    return 0
