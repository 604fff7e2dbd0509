"""`sinkprune generate`: decode a completion with the reference sampler."""
from __future__ import annotations

import argparse
import time

from sinkprune.cli_args import SEED, STEPS, add_unverified_flag, device, integer, nonempty_path, number
from sinkprune.dlm.decoding import POLICIES

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion from a prompt (LLaDA block decoding)")
    p.add_argument("--model", default="embedded", type=nonempty_path,
                   help="'embedded' or a local HF-layout model directory")
    p.add_argument("--prompt", required=True, help="the prompt text (not empty)")
    p.add_argument("--steps", type=STEPS, default=64, help="denoising steps in all (at most --gen-length)")
    p.add_argument("--gen-length", type=integer(1, 1_048_576), default=64,
                   help="tokens to generate; with the prompt, at most the model's maximum sequence length")
    p.add_argument("--block-length", type=integer(1, 1_048_576), default=32, help="must divide --gen-length")
    p.add_argument("--temperature", type=number(0, 100), default=0.0)
    p.add_argument("--remasking", choices=POLICIES, default="low_confidence")
    p.add_argument("--threshold", type=number(0, 1, lo_open=True), default=None,
                   help="Fast-dLLM parallel decoding threshold")
    p.add_argument("--cfg-scale", type=number(0, 100), default=0.0)
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                   help="Fast-dLLM's PrefixCache or DualCache (approximations; no --cfg-scale with them)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu", type=device)
    add_unverified_flag(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's own")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sinkprune.cli import UsageError, check_length, model_config
    from sinkprune.dlm.generate import generate, validate_schedule
    from sinkprune.dlm.loading import ModelLoadError, load_model
    from sinkprune.dlm.prompt import decode_completion, encode_prompt

    if not args.prompt.strip():
        raise UsageError(f"--prompt {args.prompt!r} is empty: give the text to complete")
    if args.gen_length % args.block_length:
        raise UsageError(f"--gen-length {args.gen_length} must be a multiple of --block-length {args.block_length}")
    if args.steps > args.gen_length:
        raise UsageError(f"--steps {args.steps} exceeds --gen-length {args.gen_length}: a step decodes at least "
                         "one token, so there are at most as many steps as tokens")
    blocks = args.gen_length // args.block_length
    if args.steps % blocks:
        raise UsageError(f"--steps {args.steps} must be a multiple of the number of blocks {blocks} "
                         f"(--gen-length / --block-length)")
    validate_schedule(args.steps, args.gen_length, args.block_length)  # LLaDA's rules, all checked above
    if args.cache != "none" and args.cfg_scale > 0:
        raise UsageError(f"--cache {args.cache} does not support --cfg-scale > 0")
    try:
        check_length("--gen-length", args.gen_length, model_config(args.model), args.model)
        model, tokenizer = load_model(args.model, device=args.device, allow_unverified=args.unverified,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    except ModelLoadError as err:
        raise UsageError(str(err)) from err
    prompt = encode_prompt(tokenizer, args.prompt, model.config)
    check_length("--gen-length", args.gen_length, model.config, args.model,
                 plus=len(prompt), plus_what="the prompt's tokens")
    began = time.perf_counter()
    out = generate(model, [prompt], steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                   temperature=args.temperature, remasking=args.remasking, threshold=args.threshold,
                   cfg_scale=args.cfg_scale, generator=torch.Generator(device=args.device).manual_seed(args.seed),
                   prefix_cache=args.cache == "prefix", dual_cache=args.cache == "dual")
    seconds = time.perf_counter() - began
    print(args.prompt + decode_completion(tokenizer, out.completions()[0].tolist(), model.config.eos_token_id))
    print(f"[{out.forward_passes} forward passes, {seconds:.2f} s]", flush=True)
    return 0
