"""`python -m benchmarks.bench_engine`: the engine under offered load, beside the reference loop.

Every run of this command measures, on the same prompts and in the same process:

1. load: the engine (fixed steps, no cache) with N closed-loop clients for each
   concurrency N, and the reference loop (`generate()` one request at a time);
   output tokens/s, requests/s, latency p50/p95/p99, time to first committed
   block, forward passes per generated token;
2. decoding variants through the engine at the highest concurrency: threshold
   decoding (Fast-dLLM), the prefix cache and the dual cache, alone and with
   threshold decoding, with their quality cost against the fixed-step, uncached
   outputs: token agreement and
   the NLL of the completions under the (uncached) model, paired on identical
   Monte-Carlo masks.

Completions have a fixed length (`ignore_eos`) so every variant does comparable work.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine, StepStats
from serve.engine.requests import DEFAULT_REMASKING, GenerationRequest, RequestOutput
from sinkprune.dlm.config import LLADA
from sinkprune.dlm.generate import generate
from sinkprune.dlm.likelihood import estimate_nll, paired_difference

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Measured:
    """One configuration's run over the same requests."""

    label: str
    concurrency: int
    completions: list[list[int]]
    latencies: list[float]
    first_blocks: list[float]  # seconds from arrival to the first committed block (engine only)
    wall_s: float
    cpu_s: float  # CPU time of this process: robust to other jobs sharing the machine, meaningless on GPU
    forward_passes: int  # batched passes the model ran
    request_steps: int  # denoising steps summed over requests
    computed_tokens: int  # positions the model computed, padding included
    quality: dict = field(default_factory=dict)

    def summary(self) -> dict:
        tokens = sum(len(c) for c in self.completions)
        lat = np.asarray(self.latencies) * 1000
        out = {"label": self.label, "concurrency": self.concurrency, "requests": len(self.completions),
               "output_tokens": tokens, "wall_s": round(self.wall_s, 3),
               "output_tokens_per_s": tokens / self.wall_s, "requests_per_s": len(self.completions) / self.wall_s,
               "output_tokens_per_cpu_s": tokens / self.cpu_s,
               "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
               "latency_ms_p99": float(np.percentile(lat, 99)),
               "forward_passes": self.forward_passes, "forward_passes_per_token": self.forward_passes / tokens,
               "steps_per_token": self.request_steps / tokens,
               "computed_positions_per_token": self.computed_tokens / tokens}
        if self.first_blocks:
            out["first_block_ms_p50"] = float(np.percentile(np.asarray(self.first_blocks) * 1000, 50))
        return out | self.quality


def load(args) -> tuple[torch.nn.Module, object]:
    from sinkprune.dlm.loading import load_model

    if args.random_tiny:
        return random_tiny_model(args.device, DTYPES[args.dtype or "float32"]), None
    dtype = DTYPES[args.dtype] if args.dtype else None
    return load_model(args.model, device=args.device, dtype=dtype)


def random_tiny_model(device: str, dtype: torch.dtype):
    """The embedded model's architecture with random weights: timing only, no quality."""
    from sinkprune.dlm import DLMConfig, build_model
    from sinkprune.train import init_weights

    config = DLMConfig.from_hf_config({
        "model_type": "llada", "d_model": 384, "n_heads": 6, "n_layers": 6, "mlp_hidden_size": 1024,
        "vocab_size": 4096, "mask_token_id": 2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3})
    model = build_model(config)
    init_weights(model, 0.02, seed=0)
    return model.to(device=device, dtype=dtype).eval()


def prompts_for(model, tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """Pieces of the shipped evaluation text, evenly spaced through it, led by BOS where
    the model family expects it (as `encode_prompt` does); random ids without a tokenizer."""
    config = model.config
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(4, config.vocab_size, (count, length), generator=generator).tolist()
    from sinkprune.data.corpus import load_split
    from sinkprune.data.windows import token_stream

    bos = [config.bos_token_id] if config.model_type == LLADA and config.bos_token_id is not None else []
    body = length - len(bos)
    stream = token_stream(load_split("evaluation"), tokenizer)
    stride = len(stream) // count
    if stride < body:
        raise ValueError(f"the evaluation text is too short for {count} prompts of {length} tokens")
    return [bos + stream[i * stride:i * stride + body].tolist() for i in range(count)]


async def run_engine(model, tokenizer, requests: list[GenerationRequest], concurrency: int, label: str,
                     repeats: int = 1, config: EngineConfig | None = None) -> Measured:
    """`concurrency` clients, each sending its next request as soon as the last one returns;
    of `repeats` runs, the one with the median wall time (a shared machine is noisy). `config`
    defaults to `max_num_seqs=concurrency` and a queue that holds every request."""
    config = config or EngineConfig(max_num_seqs=concurrency, max_queue=len(requests))
    runs = [await _engine_once(model, tokenizer, requests, concurrency, label, config) for _ in range(repeats)]
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


async def _engine_once(model, tokenizer, requests, concurrency, label, config: EngineConfig) -> Measured:
    engine = DLMEngine(model, tokenizer, config)
    measured = await measure_engine(engine, requests, concurrency, label)
    await engine.shutdown()
    return measured


async def measure_engine(engine: DLMEngine, requests: list[GenerationRequest], concurrency: int,
                         label: str) -> Measured:
    """`concurrency` closed-loop clients on a running `engine`, which stays up: rounds on one engine reuse
    what its first round built (CUDA graphs), so a later round times serving alone."""
    steps: list[StepStats] = []
    engine.step_listeners.append(steps.append)
    outputs: dict[str, RequestOutput] = {}
    pending = iter(requests)

    async def client() -> None:
        for request in pending:
            outputs[request.request_id] = await engine.generate(request)

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    engine.step_listeners.remove(steps.append)
    ordered = [outputs[r.request_id] for r in requests]
    return Measured(label, concurrency, [o.token_ids for o in ordered], [o.latency_s for o in ordered],
                    [o.time_to_first_block_s for o in ordered], wall, cpu, len(steps),
                    sum(o.usage.forward_passes for o in ordered), sum(s.query_tokens for s in steps))


def run_reference(model, requests: list[GenerationRequest], repeats: int = 1) -> Measured:
    """The reference loop: `generate()` on one request at a time (median of `repeats`)."""
    runs = [_reference_once(model, requests) for _ in range(repeats)]
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


def _reference_once(model, requests: list[GenerationRequest]) -> Measured:
    completions, latencies, passes, computed = [], [], 0, 0
    began, cpu = time.perf_counter(), time.process_time()
    for request in requests:
        start = time.perf_counter()
        out = generate(model, [request.prompt], steps=request.steps, gen_length=request.max_tokens,
                       block_length=request.block_length, remasking=request.remasking)
        completions.append(out.completions()[0].tolist())  # .tolist() waits for the device
        latencies.append(time.perf_counter() - start)
        passes += out.forward_passes
        computed += out.forward_passes * out.tokens.shape[1]
    return Measured("reference generate()", 1, completions, latencies, [], time.perf_counter() - began,
                    time.process_time() - cpu, passes, passes, computed)


def add_quality(model, prompts: list[list[int]], runs: list[Measured], baseline: Measured, samples: int,
                seed: int) -> None:
    """Agreement with the baseline's tokens and the completions' NLL under the model,
    each variant paired with the baseline on the same masks."""
    prompt_length = len(prompts[0])
    device = model.embed_weight.device

    def nll(run: Measured):
        sequences = torch.tensor([p + c for p, c in zip(prompts, run.completions)], device=device)
        return estimate_nll(model, sequences, samples=samples, seed=seed, scored_from=prompt_length)

    base = nll(baseline)
    for run in runs:
        result = base if run is baseline else nll(run)
        a, b = np.asarray(baseline.completions), np.asarray(run.completions)
        run.quality = {"agreement_with_baseline": float((a == b).mean()), "completion_nll": result.mean,
                       "completion_nll_stderr": result.stderr, "completion_ppl": result.perplexity}
        if run is not baseline:
            delta = paired_difference(base, result)
            run.quality |= {"delta_nll_vs_baseline": delta.mean, "delta_nll_stderr": delta.stderr}


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    widths = [max([len(header)] + [len(_cell(row.get(key, ""))) for row in rows]) for key, header in columns]
    print(f"\n{title}")
    print("  ".join(f"{header:>{w}}" for (_, header), w in zip(columns, widths)))
    for row in rows:
        print("  ".join(f"{_cell(row.get(key, '')):>{w}}" for (key, _), w in zip(columns, widths)))


LOAD_COLUMNS = [("label", "run"), ("concurrency", "conc"), ("output_tokens_per_s", "tok/s"),
                ("output_tokens_per_cpu_s", "tok/cpu-s"),
                ("requests_per_s", "req/s"), ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"),
                ("latency_ms_p99", "p99 ms"), ("first_block_ms_p50", "1st block ms"),
                ("forward_passes_per_token", "passes/tok"), ("agreement_with_baseline", "agree")]
VARIANT_COLUMNS = [("label", "variant"), ("output_tokens_per_s", "tok/s"), ("output_tokens_per_cpu_s", "tok/cpu-s"),
                   ("forward_passes_per_token", "passes/tok"), ("steps_per_token", "steps/tok"),
                   ("computed_positions_per_token", "positions/tok"), ("agreement_with_baseline", "agree"),
                   ("completion_nll", "NLL"), ("delta_nll_vs_baseline", "dNLL"), ("delta_nll_stderr", "+-")]


async def benchmark(args) -> dict:
    model, tokenizer = load(args)
    prompts = prompts_for(model, tokenizer, args.requests, args.prompt_tokens, args.seed)
    steps = args.steps or args.max_tokens
    base = [GenerationRequest(p, max_tokens=args.max_tokens, steps=steps, block_length=args.block_length,
                              remasking=args.remasking, ignore_eos=True, seed=args.seed, request_id=f"r{i}")
            for i, p in enumerate(prompts)]
    base = [replace(r, remasking=r.remasking or DEFAULT_REMASKING[model.config.model_type]) for r in base]
    await run_engine(model, tokenizer, base[:1], 1, "warm-up")
    reference = run_reference(model, base, args.repeats)
    load_runs = [await run_engine(model, tokenizer, base, c, "engine", args.repeats) for c in args.concurrency]
    top = max(args.concurrency)
    baseline = next(r for r in load_runs if r.concurrency == top)
    variants = [baseline]
    changes = [(f"threshold {t}", {"threshold": t}) for t in args.threshold] + [
        ("prefix cache", {"prefix_cache": True}), ("dual cache", {"dual_cache": True}),
        (f"threshold {args.threshold[0]} + prefix cache", {"threshold": args.threshold[0], "prefix_cache": True}),
        (f"threshold {args.threshold[0]} + dual cache", {"threshold": args.threshold[0], "dual_cache": True})]
    for label, change in changes:
        requests = [replace(r, **change) for r in base]
        variants.append(await run_engine(model, tokenizer, requests, top, label, args.repeats))
    add_quality(model, prompts, variants, baseline, args.nll_samples, args.seed)
    for run in [reference] + load_runs:
        run.quality = run.quality or {"agreement_with_baseline": float(
            (np.asarray(run.completions) == np.asarray(baseline.completions)).mean())}
    baseline_row = baseline.summary() | {"label": "fixed steps"}
    return {
        "command": "python -m benchmarks.bench_engine " + " ".join(args.argv),
        "date": date.today().isoformat(), "machine": _machine(args.device),
        "model": "random-tiny (embedded architecture, random weights)" if args.random_tiny else args.model,
        "settings": {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                     "steps": steps, "block_length": args.block_length, "remasking": base[0].remasking,
                     "threshold": args.threshold, "nll_samples": args.nll_samples, "repeats": args.repeats,
                     "dtype": str(model.embed_weight.dtype)},
        "load": [reference.summary()] + [r.summary() for r in load_runs],
        "variants": [baseline_row] + [r.summary() for r in variants[1:]],
    }


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="'embedded' or a local HF-layout model directory")
    p.add_argument("--random-tiny", action="store_true", help="the embedded architecture with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's own")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=16, help="requests per run (the same prompts in every run)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="default: max-tokens (one token per step)")
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--remasking", default=None, help="default: the model family's own")
    p.add_argument("--threshold", type=lambda s: [float(t) for t in s.split(",")], default=[0.9, 0.7, 0.5],
                   help="thresholds of the threshold-decoding variants (the first also runs with the prefix cache)")
    p.add_argument("--nll-samples", type=int, default=8, help="Monte-Carlo samples per completion")
    p.add_argument("--repeats", type=int, default=1, help="time every run this often, keep the median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(benchmark(args))
    print(f"{results['model']} on {results['machine']}, {results['date']}: {results['settings']}")
    print_table("offered load (closed loop; agree = tokens equal to the fixed-step engine run)", results["load"],
                LOAD_COLUMNS)
    print_table(f"decoding variants at concurrency {max(args.concurrency)} (quality vs fixed steps, uncached)",
                results["variants"], VARIANT_COLUMNS)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
