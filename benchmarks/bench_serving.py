"""`python -m benchmarks.bench_serving`: the engine serving dense against 2:4-pruned, with and without CUDA graphs.

Builds an LLaDA-8B- or Dream-7B-shaped model with random weights on the device
(`--layers` keeps fewer blocks), magnitude-prunes every block linear 2:4, and
serves it through `DLMEngine` with closed-loop clients (dual cache, one token per
step, `ignore_eos`) at each concurrency: first as the dense replica serves it
(`nn.Linear`), then as the pruned replica does; both prepared by the replica's own
`serve.engine.prepare.prepare_for_serving` (q/k/v and gate/up fused, and for the pruned
variant the dispatch measured on this device at the engine's M values, then the swap),
each with CUDA graphs on and off; `--threshold` adds Fast-dLLM threshold decoding at the
highest concurrency. Reports output tokens/s, latency p50/p99, request steps per token,
the ratio of each run to the dense one with graphs (at the same threshold), and the weights'
memory floor: reading every linear weight once per engine step (one batched pass) at the copy
bandwidth measured on the device in this run, and the share of the wall time those reads would
take (1.0: the run is as fast as reading the dense weights allows). A profiled round after each
timed one counts what the device did: its busy time against the wall time, and launches per
output token and per engine step (`sinkkernels.timing.profile_call`). Each engine captures the
dual-cache block passes' graphs when it is built, as a replica does at start; rows report how
many, the seconds and the memory. `--compile on` runs the elementwise chains compiled. Writes JSON. On CPU it
runs the same path on a small model (`--layers 1`) to check it, not to time it.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import measure_engine
from benchmarks.bench_step import build, prune_24
from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.requests import GenerationRequest
from serve.engine.prepare import prepare_for_serving
from sinkkernels.timing import DeviceActivity, profile_call


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def requests_for(config, count: int, prompt_tokens: int, max_tokens: int, block: int, seed: int,
                 threshold: float | None = None):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size - 1, (count, prompt_tokens), generator=generator)
    prompts = (ids + (ids >= config.mask_token_id).long()).tolist()  # never the mask token
    return [GenerationRequest(prompt=p, max_tokens=max_tokens, steps=max_tokens, block_length=block,
                              threshold=threshold, ignore_eos=True, dual_cache=True, seed=i, request_id=f"r{i}")
            for i, p in enumerate(prompts)]


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Bytes per second one device-to-device copy moves (read + write), best of 5 after a warm-up: the
    memory floor's rate."""
    source = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def with_floor(row: dict, floor_s_per_step: float) -> dict:
    """The row with its engine steps (batched passes: each reads the weights once, whatever the batch),
    the floor per step and the share of the wall time the floor is."""
    steps = row["forward_passes"]
    return row | {"engine_steps": steps, "weights_floor_ms_per_step": floor_s_per_step * 1e3,
                  "floor_fraction": steps * floor_s_per_step / row["wall_s"]}


def with_activity(row: dict, profiled: dict, activity: DeviceActivity) -> dict:
    """The row with what the device did in the profiled round (`profiled`: its summary): busy time against
    wall time, launches per output token and per engine step."""
    return row | {"busy_fraction": activity.busy_fraction,
                  "launches_per_token": activity.launches / profiled["output_tokens"],
                  "launches_per_step": activity.launches / profiled["forward_passes"],
                  "profiled": {"requests": profiled["requests"], "output_tokens": profiled["output_tokens"],
                               "engine_steps": profiled["forward_passes"], "wall_s": activity.wall_s,
                               "busy_s": activity.busy_s, "launches": activity.launches}}


def serve(model, args, variant: str, graphs: bool, concurrency: int, threshold: float | None,
          floor_s_per_step: float) -> dict:
    """One configuration's row, three rounds on one engine: a warm-up (one request per client: graphs
    captured, kernels chosen), the timed round, then a profiled round as short as the warm-up (the
    profiler slows the host, so it times nothing but itself)."""
    requests = requests_for(model.config, args.requests_per_client * concurrency, args.prompt_tokens,
                            args.max_tokens, args.block, args.seed, threshold)
    config = EngineConfig(max_num_seqs=concurrency, max_queue=len(requests), dual_cache=True,
                          cuda_graphs=graphs, max_model_len=args.prompt_tokens + args.max_tokens,
                          capture_block_lengths=(args.block,))
    engine = DLMEngine(model, None, config)  # captures the block passes' graphs, as a replica at start
    captured_at_start = engine.runner.stats()["captured_at_start"]
    with asyncio.Runner() as loop:  # one event loop: the engine stays bound to it
        loop.run(measure_engine(engine, requests[:concurrency], concurrency, "warm-up"))
        measured = loop.run(measure_engine(engine, requests, concurrency, variant))
        profiled, activity = profile_call(
            lambda: loop.run(measure_engine(engine, requests[:concurrency], concurrency, "profiled")),
            args.device)
        loop.run(engine.shutdown())
    row = {"variant": variant, "cuda_graphs": graphs, "threshold": threshold} | measured.summary() \
        | {"captured_at_start": captured_at_start, "runner": engine.runner.stats()}
    return with_activity(with_floor(row, floor_s_per_step), profiled.summary(), activity)


def serve_runs(model, args, variant: str, floor_s_per_step: float) -> list[dict]:
    """Every concurrency, then every threshold at the highest one; with graphs, then without."""
    runs = [(c, None) for c in args.concurrency] + [(max(args.concurrency), t) for t in args.threshold]
    rows = []
    for graphs in args.graphs:
        for concurrency, threshold in runs:
            rows.append(serve(model, args, variant, graphs, concurrency, threshold, floor_s_per_step))
            r = rows[-1]
            print(f"{variant:6} graphs={graphs!s:5} concurrency {concurrency:3} threshold {threshold!s:4}: "
                  f"{r['output_tokens_per_s']:8.1f} tok/s, p50 {r['latency_ms_p50']:8.1f} ms, "
                  f"busy {r['busy_fraction']:.2f}, {r['launches_per_token']:.0f} launches/token", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["concurrency"], r["threshold"]): r["output_tokens_per_s"] for r in rows
            if r["variant"] == "dense" and r["cuda_graphs"]}
    lines = ["| variant | CUDA graphs | concurrency | threshold | output tok/s | p50 ms | p99 ms | steps / token | "
             "launches / token | busy / wall | weights floor / wall | vs dense with graphs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["output_tokens_per_s"] / base[key] if (key := (r["concurrency"], r["threshold"])) in base else None
        lines.append(f"| {r['variant']} | {'on' if r['cuda_graphs'] else 'off'} | {r['concurrency']} | "
                     f"{'' if r['threshold'] is None else r['threshold']} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} | "
                     f"{r['steps_per_token']:.2f} | {r['launches_per_token']:.0f} | {r['busy_fraction']:.2f} | "
                     f"{r['floor_fraction']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-8b", choices=("llada-8b", "dream-7b", "embedded"),
                        help="a public shape with random weights, or the embedded model (a quick CPU check)")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N blocks (default: all)")
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--graphs", type=lambda s: [part == "on" for part in s.split(",")], default=[True, False],
                        help="comma-separated on/off (default: on,off)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["dense", "pruned"])
    parser.add_argument("--fuse", choices=("on", "off"), default="on",
                        help="serve q/k/v and gate/up fused, as a replica does by default (EngineConfig.fuse_projections)")
    parser.add_argument("--compile", choices=("on", "off"), default="off",
                        help="run the norm, rotary and SwiGLU chains compiled (EngineConfig.compile_elementwise)")
    parser.add_argument("--threshold", type=_floats, action="extend", default=[],
                        help="Fast-dLLM threshold decoding at the highest concurrency, one row per threshold "
                             "(comma-separated or repeated; default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_serving.json"))
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if not set(args.variants) <= {"dense", "pruned"}:
        parser.error("--variants: choose among dense, pruned")
    if args.max_tokens % args.block:
        parser.error("--max-tokens must be a multiple of --block")
    if not all(0 < t <= 1 for t in args.threshold):
        parser.error("--threshold must be in (0, 1]")
    args.fuse, args.compile = args.fuse == "on", args.compile == "on"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.model, args.layers, device, dtype, args.seed)
    prune_24(model)  # both variants serve the same 2:4 weights: only the kernels differ
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    bandwidth = copy_bandwidth(device)
    report = {"model": args.model, "layers": len(model.blocks), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "command": " ".join(["python -m benchmarks.bench_serving", *(sys.argv[1:] if argv is None else argv)]),
              "linear_weight_bytes": linear_bytes, "copy_bandwidth_bytes_per_s": bandwidth, "rows": []}
    for variant in ("dense", "pruned"):
        if variant not in args.variants:
            continue
        config = EngineConfig(max_num_seqs=max(args.concurrency), fuse_projections=args.fuse,
                              compile_elementwise=args.compile)
        report[f"prepare_{variant}"] = prepare_for_serving(model, config, sparse=variant == "pruned").summary()
        report["rows"] += serve_runs(model, args, variant, linear_bytes / bandwidth)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each variant: an overrun keeps the first
    print(table(report["rows"]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
