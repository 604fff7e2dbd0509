"""`python -m benchmarks.bench_prune`: the offline stage, stage by stage, against the machine's own matmul rate.

Runs what `sinkprune prune` runs (load, dense quality, sink mass, layer-by-layer
calibration, pruned quality, write) and prints, for each stage, its wall time,
the FLOPs it must do (linear layers and attention, counted from the config) and
the rate that makes, as a share of the rate this machine reaches on one large
matmul in the calibration dtype (measured first, best of several), and the
CPU time the process spent (on a shared machine wall time is noise; CPU time
over threads is the wall time an idle machine would take). It also
records the process's peak resident memory after each stage and the memory
estimate of `sinkprune.calibration_memory`, and writes everything as JSON.

    python -m benchmarks.bench_prune --model embedded --out runs/bench_prune.json
    python -m benchmarks.bench_prune --model runs/llada8b-2 --calibration-windows 4 --seq-len 512 \\
        --eval-windows 0 --hidden-states disk --out runs/bench_prune_8b.json

Set ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to measure a CPU without
bf16 instructions on one that has them (both are recorded in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from sinkprune.artifact import write_artifact
from sinkprune.calibration import default_timesteps
from sinkprune.calibration_memory import prune_memory
from sinkprune.compute_dtype import CHOICES, matmul_rate, stored_and_calibration_dtype
from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.likelihood import estimate_nll
from sinkprune.dlm.loading import load_model, resolve_model_dir
from sinkprune.evaluate import paired_report, text_windows
from sinkprune.hidden_store import PLACES
from sinkprune import prune as prune_module
from sinkprune.prune import AUTO_METHOD, CALIBRATIONS, METHODS, STATISTIC_OF, PruneSettings, prune_model
from sinkprune.sink_scores import timestep_sink_scores


def block_flops_per_token(config: DLMConfig, seq_len: int) -> int:
    """Multiply-adds x 2 of one block for one token: its linears, and attention over `seq_len` keys."""
    d, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    linears = d * head_dim * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * inter
    return 2 * linears + 2 * 2 * config.num_heads * head_dim * seq_len


def model_flops_per_token(config: DLMConfig, seq_len: int, head: bool = True) -> int:
    return config.num_layers * block_flops_per_token(config, seq_len) + (2 * config.hidden_size * config.vocab_size
                                                                         if head else 0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Stages:
    """Times stages and prints one line each as it ends."""

    def __init__(self, rate: float):
        self.rate, self.rows = rate, []

    def run(self, name: str, flops: float, work):
        began, cpu_began = time.perf_counter(), time.process_time()
        result = work()
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        row = {"stage": name, "seconds": round(seconds, 6), "cpu_seconds": round(cpu, 6), "gflop": round(flops / 1e9, 1),
               "gflop_per_s": round(flops / seconds / 1e9, 1) if flops else None,
               "share_of_matmul_rate": round(flops / seconds / self.rate, 3) if flops else None,
               "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)}
        self.rows.append(row)
        rate = f"{row['gflop_per_s']:8.1f} GFLOP/s ({row['share_of_matmul_rate']:.0%} of matmul)" if flops else ""
        print(f"{name:>16}: {seconds:7.1f} s ({cpu:7.1f} CPU-s) {row['gflop']:9.1f} GFLOP {rate}  "
              f"peak RSS {row['peak_rss_gib']:.2f} GiB",
              flush=True)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--method", choices=(AUTO_METHOD, *METHODS), default=AUTO_METHOD,
                        help="auto: what `sinkprune prune` takes by default for the pattern")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calibration", choices=("auto", *CALIBRATIONS), default="auto")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--every", type=int, default=5, help="timestep grid: 50 steps sampled every N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--calibration-dtype", choices=CHOICES, default="auto")
    parser.add_argument("--hidden-states", choices=PLACES, default="device")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_prune.json"))
    args = parser.parse_args(argv)

    source = resolve_model_dir(args.model)
    stored, compute = stored_and_calibration_dtype(source, args.device, args.calibration_dtype)
    baseline_rss = peak_rss_bytes()  # the interpreter and libraries, before any weight exists
    rates = {dt: matmul_rate(args.device, dt, rows=2048, reps=5) for dt in dict.fromkeys((torch.float32, stored, compute))}
    rate = rates[compute]
    print(f"matmul rates (GFLOP/s): { {_name(k): round(v / 1e9, 1) for k, v in rates.items()} }; "
          f"calibrating in {_name(compute)} (stored {_name(stored)})", flush=True)
    stages = Stages(rate)
    model, tokenizer = stages.run("load", 0, lambda: load_model(source, device=args.device, dtype=compute))
    config, seq = model.config, args.seq_len
    timesteps = default_timesteps(50, args.every)
    settings = PruneSettings(args.method, args.pattern, timesteps, batch_size=args.batch_size,
                             calibration=args.calibration)
    windows = text_windows(tokenizer, "calibration", args.calibration_windows, seq)
    samples = len(windows) * (len(timesteps) if settings.calibration == "noised" else 1)
    statistic = STATISTIC_OF[settings.method.removeprefix("sink-")]
    print(f"method: {settings.method}, calibration {settings.calibration}", flush=True)
    memory = prune_memory(config, settings, len(windows), seq, compute, args.hidden_states)
    print(memory.describe(), flush=True)
    scored = text_windows(tokenizer, "evaluation", args.eval_windows, seq) if args.eval_windows else None
    eval_flops = len(scored) * args.eval_samples * seq * model_flops_per_token(config, seq) if scored is not None else 0
    dense = stages.run("dense quality", eval_flops,
                       lambda: estimate_nll(model, scored, args.eval_samples)) if scored is not None else None
    scores = None
    if settings.method.startswith("sink-"):
        mass_flops = len(timesteps) * len(windows) * seq * model_flops_per_token(config, seq, head=False)
        scores = stages.run("sink mass", mass_flops, lambda: timestep_sink_scores(
            model, windows, timesteps, settings.seed, settings.k, settings.alpha, args.batch_size))
    passes = 2 * config.num_layers - 1 if statistic else 0
    calibration_flops = samples * seq * block_flops_per_token(config, seq) * passes
    solve = _timed(prune_module, "prune_linears")  # the selection / SparseGPT solver inside calibrate+prune
    with solve:
        stages.run("calibrate+prune", calibration_flops, lambda: prune_model(
            model, settings, windows, sink_scores=scores, hidden_states=args.hidden_states))
    stages.rows[-1] |= {"solve_seconds": round(solve.seconds, 3), "solve_cpu_seconds": round(solve.cpu_seconds, 3)}
    print(f"{'':>16}  of which selection / solver: {solve.seconds:.1f} s ({solve.cpu_seconds:.1f} CPU-s)", flush=True)
    quality = None
    if dense is not None:
        pruned = stages.run("pruned quality", eval_flops, lambda: estimate_nll(model, scored, args.eval_samples))
        quality = paired_report({"dense": dense, "pruned": pruned})
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        manifest = {"base_model": str(args.model), **settings.to_dict()}
        stages.run("write", 0, lambda: write_artifact(model, Path(tmp) / "artifact", tokenizer, manifest, dtype=stored))
    total = sum(row["seconds"] for row in stages.rows)
    total_cpu = sum(row["cpu_seconds"] for row in stages.rows)
    print(f"{'total':>16}: {total:7.1f} s ({total_cpu:.1f} CPU-s); peak RSS {peak_rss_bytes() / 2**30:.2f} GiB = "
          f"{baseline_rss / 2**30:.2f} GiB before loading + {(peak_rss_bytes() - baseline_rss) / 2**30:.2f} GiB "
          f"(estimate: {memory.in_memory() / 2**30:.2f} GiB)")
    report = {
        "benchmark": "bench_prune", "date": date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.bench_prune", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
                    "isa_env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}},
        "settings": vars(args) | {"out": str(args.out), "samples": samples, "timesteps": timesteps,
                                  "method": settings.method, "calibration": settings.calibration},
        "stored_dtype": _name(stored), "calibration_dtype": _name(compute),
        "matmul_gflop_per_s": {_name(k): round(v / 1e9, 1) for k, v in rates.items()},
        "stages": stages.rows, "total_seconds": round(total, 1), "total_cpu_seconds": round(total_cpu, 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline_rss,
        "memory_estimate": memory.to_dict(), "quality": quality,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


class _timed:
    """Within `with`, times every call of `module.name` (wall and process CPU seconds)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds, self.cpu_seconds = module, name, 0.0, 0.0

    def __enter__(self):
        self.original = getattr(self.module, self.name)

        def timed(*args, **kwargs):
            began, cpu_began = time.perf_counter(), time.process_time()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began
                self.cpu_seconds += time.process_time() - cpu_began

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
