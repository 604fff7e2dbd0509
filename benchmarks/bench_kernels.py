"""Benchmark of the 2:4 backends against dense: `python -m benchmarks.bench_kernels`.

On CUDA: the linear shapes of LLaDA-8B and Dream-7B for M = 1 .. 16384; every
backend runs through `Sparse24Linear` with the backend forced (what serving runs,
padding and all); each is checked against dense, then timed with CUDA events after
warm-up, the L2 cache flushed before every repetition, the median kept. Writes the
JSON of every measurement and the dispatch table (fastest backend per M range),
and prints a markdown table.

On CPU (`--cpu-smoke`, or automatically without CUDA): tiny shapes, dense and the
Triton interpreter only, to check that the path works. Those timings are not
performance numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sinkkernels.dispatch import BACKENDS, DEFAULT_TABLE, TABLE_FORMAT, BackendUnavailable, fastest_steps, table_key
from sinkkernels.sparse24 import Sparse24Linear  # imports the Triton kernel only when a layer uses it, after main() ran
from sinkkernels.testing import random_24_weight
from sinkkernels.timing import time_cpu, time_cuda, time_cuda_eager_stream

SHAPES = {  # (out_features N, in_features K) of the linear layers
    "llada-8b": [(4096, 4096), (12288, 4096), (4096, 12288)],
    "dream-7b": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)],
}
M_VALUES = tuple(2 ** i for i in range(15))  # 1 .. 16384
SMOKE_SHAPES = {"smoke": [(64, 64), (40, 72)]}
SMOKE_M_VALUES = (1, 5, 33)
SMOKE_BACKENDS = ("dense", "triton")
SMOKE_BANNER = ("CPU SMOKE RUN: a functional check of the dense and Triton-interpreter paths at tiny sizes. "
                "These timings are NOT performance numbers.")


@dataclass(frozen=True)
class Roofline:
    """Peaks of the GPU (defaults: H100 SXM, bf16/fp16)."""

    dense_tflops: float = 989.0
    sparse_tflops: float = 1979.0
    bandwidth_tbs: float = 3.35


@dataclass
class Row:
    model: str
    n: int
    k: int
    m: int
    backend: str
    ms: float | None = None
    eager_ms: float | None = None  # per call, back to back without graphs (host overhead included)
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    roofline: float | None = None
    max_rel_err: float | None = None
    skipped: str | None = None


def bytes_moved(m: int, n: int, k: int, backend: str, element: int) -> int:
    """Bytes a product must move at least: x, y and the weight (2:4: half the values + 4 bits per group of 4)."""
    weight = n * k * element if backend == "dense" else n * k // 2 * element + n * k // 8
    return (m * k + m * n) * element + weight


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (fp32)."""
    reference = reference.float()
    return float((y.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6))


def bench_shape(model: str, n: int, k: int, m_values: tuple[int, ...], backends: tuple[str, ...],
                dtype: torch.dtype, device: torch.device, warmup: int, reps: int, roofline: Roofline) -> list[Row]:
    weight = random_24_weight(n, k, dtype, device, seed=n + k)
    layers: dict[str, Sparse24Linear | str] = {}
    for backend in backends:
        try:
            layers[backend] = Sparse24Linear.from_dense(weight, backend=backend)
        except BackendUnavailable as error:
            layers[backend] = str(error)
    timer = time_cuda if device.type == "cuda" else time_cpu
    element = weight.element_size()
    rows = []
    for m in m_values:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype=dtype, device=device)
        reference = x.float() @ weight.float().T
        dense_seconds = None
        for backend, layer in layers.items():
            row = Row(model, n, k, m, backend)
            rows.append(row)
            if isinstance(layer, str):
                row.skipped = layer
                continue
            with torch.no_grad():
                row.max_rel_err = relative_error(layer(x), reference)
                seconds = timer(lambda: layer(x), warmup, reps)
                if device.type == "cuda":
                    row.eager_ms = time_cuda_eager_stream(lambda: layer(x)) * 1e3
            dense_seconds = seconds if backend == "dense" else dense_seconds
            moved = bytes_moved(m, n, k, backend, element)
            peak = roofline.sparse_tflops if backend in ("cusparselt", "cutlass") else roofline.dense_tflops
            ideal = max(2 * m * n * k / (peak * 1e12), moved / (roofline.bandwidth_tbs * 1e12))
            row.ms = seconds * 1e3
            row.tflops = 2 * m * n * k / seconds / 1e12
            row.gbps = moved / seconds / 1e9
            row.speedup = None if dense_seconds is None else dense_seconds / seconds
            row.roofline = ideal / seconds if device.type == "cuda" else None
    return rows


def dispatch_plans(rows: list[Row], device_name: str, dtype: torch.dtype) -> dict[str, list]:
    """Fastest backend at each measured M, merged into (max_m, backend) steps per shape."""
    plans: dict[str, list] = {}
    for n, k in sorted({(r.n, r.k) for r in rows}):
        times: dict[int, dict[str, float]] = {}
        for r in rows:
            if (r.n, r.k) == (n, k) and r.ms is not None:
                times.setdefault(r.m, {})[r.backend] = r.ms
        plans[table_key(device_name, dtype, n, k)] = fastest_steps(times)
    return plans


def write_table(plans: dict[str, list], path: Path) -> None:
    """Merge `plans` into the dispatch table at `path` (plans of other GPUs and dtypes are kept)."""
    existing = json.loads(path.read_text())["plans"] if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": TABLE_FORMAT, "plans": {**existing, **plans}}, indent=1) + "\n")


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(rows: list[Row]) -> str:
    lines = ["| model | N x K | M | backend | ms (graph) | ms (eager) | TFLOP/s | GB/s | speedup vs dense | roofline "
             "| max rel err |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.model} | {r.n}x{r.k} | {r.m} | {r.backend} | skipped: {r.skipped} | | | | | | |")
            continue
        lines.append(f"| {r.model} | {r.n}x{r.k} | {r.m} | {r.backend} | {_cell(r.ms, '.4f')} | "
                     f"{_cell(r.eager_ms, '.4f')} | "
                     f"{_cell(r.tflops, '.2f')} | {_cell(r.gbps, '.1f')} | {_cell(r.speedup, '.2f')} | "
                     f"{_cell(r.roofline, '.0%')} | {_cell(r.max_rel_err, '.1e')} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU functional check (automatic without CUDA)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--m", type=int, nargs="+", help=f"values of M (default {M_VALUES[0]}..{M_VALUES[-1]})")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="dense is always measured first (the baseline)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/kernels_bench.json"))
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="dispatch table to write (CUDA runs)")
    parser.add_argument("--peak-dense-tflops", type=float, default=Roofline.dense_tflops)
    parser.add_argument("--peak-sparse-tflops", type=float, default=Roofline.sparse_tflops)
    parser.add_argument("--bandwidth-tbs", type=float, default=Roofline.bandwidth_tbs)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the Triton kernel
        print(SMOKE_BANNER)
    device = torch.device("cpu" if smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    shapes = SMOKE_SHAPES if smoke else {name: SHAPES[name] for name in args.models}
    m_values = tuple(args.m) if args.m else (SMOKE_M_VALUES if smoke else M_VALUES)
    chosen = SMOKE_BACKENDS if smoke else args.backends
    backends = ("dense",) + tuple(b for b in chosen if b != "dense")
    roofline = Roofline(args.peak_dense_tflops, args.peak_sparse_tflops, args.bandwidth_tbs)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = [row for model, model_shapes in shapes.items() for n, k in model_shapes
            for row in bench_shape(model, n, k, m_values, backends, dtype, device,
                                   2 if smoke else args.warmup, 3 if smoke else args.reps, roofline)]
    report = {"device": device_name, "dtype": args.dtype, "smoke": smoke, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.bench_kernels", *(sys.argv[1:] if argv is None else argv)]),
              "roofline": asdict(roofline), "rows": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(rows))
    print(f"\nwrote {args.out}")
    if not smoke:
        write_table(dispatch_plans(rows, device_name, dtype), args.table)
        print(f"wrote dispatch table {args.table}")
    else:
        print(SMOKE_BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
