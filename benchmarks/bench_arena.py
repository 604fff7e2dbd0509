"""`python -m benchmarks.bench_arena`: one dual-cache block pass of the engine's runner against a long context.

A block step computes a few queries per row but reads every cached key and value of the row: at long
contexts that read, not the linears, sets the step's floor. This times the runner's own pass (the KV
arena written in place, read as a view of the packed slots, or gathered when the rows' slots are out of
order) on a LLaDA-shaped model whose width is a flag, so a CPU can reach the regime where the KV read
dominates. It reports ms per pass and the KV bytes the pass must read at least once, as GB/s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from serve.engine.model_runner import ModelRunner
from serve.engine.sequence import PassPlan
from sinkkernels.timing import time_cpu, time_cuda
from sinkprune.cli_args import COUNT, integer
from sinkprune.dlm import DLMConfig, build_model
from sinkprune.dlm.presets import LLADA_8B

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llada_shaped(d_model: int, layers: int, heads: int, kv_heads: int) -> DLMConfig:
    """LLaDA-8B's block at another width (MLP 2.75x wide, as LLaDA's), with a small vocabulary; fewer key/value
    heads than query heads make it grouped-query, as Dream-7B is (28 and 4)."""
    return DLMConfig.from_hf_config(dict(LLADA_8B, d_model=d_model, n_heads=heads, n_kv_heads=kv_heads,
                                         n_layers=layers, mlp_hidden_size=d_model * 11 // 4, vocab_size=4096,
                                         embedding_size=4096, mask_token_id=4000, eos_token_id=4001,
                                         pad_token_id=4001))


def block_pass(runner: ModelRunner, rows: int, block: int, context: int, gather: bool):
    """The runner's pass for `rows` blocks in the middle of their `context` cached positions."""
    offset = (context - block) // 2
    plans = [PassPlan([7] * block, offset, True, context, False, (offset, offset + block)) for _ in range(rows)]
    slots = list(range(rows))[::-1] if gather else list(range(rows))
    static = runner.prepare(plans, slots)
    assert static.shape.gather == gather, static.shape
    return static.run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_arena", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--d-model", type=integer(16, 65536), default=1024)
    parser.add_argument("--heads", type=integer(1, 256), default=16)
    parser.add_argument("--kv-heads", type=integer(1, 256), help="key/value heads (default: --heads)")
    parser.add_argument("--layers", type=integer(1, 128), default=2)
    parser.add_argument("--rows", type=COUNT, default=8)
    parser.add_argument("--block", type=COUNT, default=32)
    parser.add_argument("--context", type=integer(1, 1_048_576), default=2048)
    parser.add_argument("--warmup", type=COUNT, default=3)
    parser.add_argument("--reps", type=COUNT, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_arena.json"))
    args = parser.parse_args(argv)
    if args.block > args.context:
        parser.error(f"--block {args.block} is longer than --context {args.context}")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} does not split into {args.heads} heads")
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} do not split into groups of --kv-heads {args.kv_heads}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    config = llada_shaped(args.d_model, args.layers, args.heads, args.kv_heads)
    model = build_model(config, dtype=dtype).to(device).eval()
    runner = ModelRunner(model, slots=args.rows, max_length=args.context, cuda_graphs=False)
    kv_width = args.d_model // args.heads * args.kv_heads
    kv_bytes = 2 * args.layers * args.rows * args.context * kv_width * dtype.itemsize  # keys and values, read once
    results = []
    with torch.no_grad():
        for gather in (False, True):
            run = block_pass(runner, args.rows, args.block, args.context, gather)
            seconds = time_cuda(run, args.warmup, args.reps) if device.type == "cuda" else \
                time_cpu(run, args.warmup, args.reps)
            results.append({"read": "gathered" if gather else "view", "ms": seconds * 1e3,
                            "kv_gb_per_s": kv_bytes / seconds / 1e9})
    print("| KV read | ms / block pass | KV GB/s |\n| --- | ---: | ---: |")
    for row in results:
        print(f"| {row['read']} | {row['ms']:.2f} | {row['kv_gb_per_s']:.1f} |")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": {key: getattr(args, key) for key in ("d_model", "heads", "kv_heads", "layers", "rows", "block",
                                                             "context", "warmup", "reps")},
              "command": " ".join(["python -m benchmarks.bench_arena", *(sys.argv[1:] if argv is None else argv)]),
              "kv_bytes": kv_bytes, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
