"""Which backend runs a 2:4 linear layer, per device, dtype, weight shape and M (rows of the input).

Order of precedence: an explicit `backend` argument, then the environment variable
`SINKSERVE_SPARSE_BACKEND` (both force one backend for every M, and fail loudly if it
cannot run), then the table the GPU benchmark writes (`python -m benchmarks.bench_kernels`),
then the default: CPU, or a dtype other than fp16/bf16 -> `dense`; CUDA fp16/bf16 -> `triton` for
M <= 64 (memory-bound: fewer bytes read wins) and `cusparselt` above (compute-bound:
sparse tensor cores win), each replaced by `dense` where it cannot run.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("dense", "triton", "cusparselt", "cutlass")
ENV_BACKEND = "SINKSERVE_SPARSE_BACKEND"
ENV_TABLE = "SINKSERVE_SPARSE_TABLE"
DEFAULT_TABLE = Path(__file__).with_name("dispatch_table.json")
TABLE_FORMAT = "sinkserve-sparse-dispatch-v1"
SMALL_M = 64
HALF_DTYPES = (torch.float16, torch.bfloat16)
# PyTorch's CUTLASS semi-structured sparsity, fp16/bf16 weights: rows and columns must be multiples of these.
CUTLASS_MULTIPLES = (32, 64)


class BackendUnavailable(RuntimeError):
    """A backend was asked for where it cannot run (wrong device, dtype, shape or build)."""


@dataclass(frozen=True)
class Plan:
    """Backend per range of M: `steps` are (max_m, backend) sorted by max_m, the last max_m None (no bound)."""

    steps: tuple[tuple[int | None, str], ...]

    def backend_for(self, m: int) -> str:
        return next(backend for max_m, backend in self.steps if max_m is None or m <= max_m)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(backend for _, backend in self.steps))


def single(backend: str) -> Plan:
    return Plan(((None, backend),))


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, out_features: int,
                       in_features: int) -> str | None:
    """Why `backend` cannot run this layer here, or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}: choose one of {', '.join(BACKENDS)} (or 'auto')")
    if backend == "dense":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs the triton package, which is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"the triton backend runs on a CUDA device, the weight is on {device} (on CPU it runs only "
                    "under TRITON_INTERPRET=1, the slow interpreter the tests use); use backend 'dense' on CPU")
        if dtype not in HALF_DTYPES + (torch.float32,):
            return f"the triton backend takes float16, bfloat16 or float32, not {dtype}"
        return None
    if backend == "cusparselt":
        from .cusparselt import unavailable_reason as cusparselt_reason
        return cusparselt_reason(device, dtype, out_features, in_features)
    if device.type != "cuda":
        return (f"the {backend} backend needs a CUDA GPU (PyTorch semi-structured sparsity is CUDA only), the "
                f"weight is on {device}; use backend 'dense' on CPU")
    if dtype not in HALF_DTYPES:
        return f"the {backend} backend takes float16 or bfloat16 weights, not {dtype}"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 8:
        return (f"the cutlass backend is PyTorch's CUTLASS 2:4 kernel, built for Ampere-class GPUs only (compute "
                f"capability 8.x); this GPU is {capability[0]}.{capability[1]}")
    rows, cols = CUTLASS_MULTIPLES
    if out_features % rows or in_features % cols:
        return (f"the cutlass backend needs out_features a multiple of {rows} and in_features a multiple of "
                f"{cols}, got a ({out_features}, {in_features}) weight")
    return None


def check_backend(backend: str, device: torch.device, dtype: torch.dtype, out_features: int,
                  in_features: int) -> None:
    """Raise BackendUnavailable with the reason when `backend` cannot run this layer here."""
    reason = unavailable_reason(backend, device, dtype, out_features, in_features)
    if reason is not None:
        raise BackendUnavailable(reason)


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced by the argument or by SINKSERVE_SPARSE_BACKEND; None (or 'auto') means choose."""
    choice = (backend if backend is not None else os.environ.get(ENV_BACKEND, "")).strip().lower()
    if choice in ("", "auto"):
        return None
    if choice not in BACKENDS:
        source = "backend argument" if backend is not None else ENV_BACKEND
        raise ValueError(f"{source}={choice!r} is not a sparse backend: choose one of {', '.join(BACKENDS)} or auto")
    return choice


def table_key(device_name: str, dtype: torch.dtype, out_features: int, in_features: int) -> str:
    return f"{device_name}|{str(dtype).removeprefix('torch.')}|{out_features}x{in_features}"


def fastest_steps(times: dict[int, dict[str, float]], dense_margin: float = 0.0) -> list[list]:
    """(max_m, backend) steps from the time of each backend at each measured M: the fastest per M, where
    a backend other than dense must beat dense by `dense_margin` (a fraction) to be chosen; consecutive
    M with the same choice merge, the last step has no bound."""
    best = []
    for m in sorted(times):
        by_backend = times[m]
        choice = min(by_backend, key=by_backend.get)
        if "dense" in by_backend and by_backend[choice] > by_backend["dense"] * (1 - dense_margin):
            choice = "dense"
        best.append((m, choice))
    steps = [[m, b] for i, (m, b) in enumerate(best) if i + 1 == len(best) or best[i + 1][1] != b]
    steps[-1][0] = None
    return steps


def single_representation_steps(times: dict[int, dict[str, float]], dense_margin: float = 0.0) -> list[list]:
    """The plan for a replica that holds each layer's weight in one form only: one backend for every M.

    A mixed plan (dense at small M, a sparse backend at large M, say) keeps the dense weight and a compressed
    one, more memory than dense alone. Here a sparse backend is chosen only if it is never slower than dense
    at any measured M and its time summed over them beats dense by `dense_margin`; the fastest such backend
    wins, else dense. `times` holds dense at every M (the measurement always times it)."""
    def total(backend: str) -> float:
        return sum(by_backend[backend] for by_backend in times.values())

    candidates = [b for b in next(iter(times.values())) if b != "dense"
                  and all(b in by_backend and by_backend[b] <= by_backend["dense"] for by_backend in times.values())]
    best = min(candidates, key=total, default="dense")
    return [[None, best if total(best) <= total("dense") * (1 - dense_margin) else "dense"]]


def load_table(path: Path | str | None = None) -> dict[str, list]:
    """Plans measured by the benchmark ({key: [[max_m, backend], ...]}), or {} when there is no table."""
    path = Path(path or os.environ.get(ENV_TABLE) or DEFAULT_TABLE)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a sparse dispatch table (format {data.get('format')!r}, "
                         f"expected {TABLE_FORMAT!r})")
    return data["plans"]


def _default_plan(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Plan:
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return single("dense")

    def usable(backend: str) -> str:
        return "dense" if unavailable_reason(backend, device, dtype, out_features, in_features) else backend

    small, large = usable("triton"), usable("cusparselt")
    return single(small) if small == large else Plan(((SMALL_M, small), (None, large)))


def plan_for(device: torch.device | str, dtype: torch.dtype, out_features: int, in_features: int,
             backend: str | None = None, table: dict[str, list] | None = None) -> Plan:
    """The plan for one layer; a forced backend that cannot run raises BackendUnavailable."""
    device = torch.device(device)
    forced = forced_backend(backend)
    if forced is not None:
        check_backend(forced, device, dtype, out_features, in_features)
        return single(forced)
    if device.type == "cuda":
        table = load_table() if table is None else table
        steps = table.get(table_key(torch.cuda.get_device_name(device), dtype, out_features, in_features))
        if steps and all(unavailable_reason(b, device, dtype, out_features, in_features) is None for _, b in steps):
            return Plan(tuple((max_m, b) for max_m, b in steps))
    return _default_plan(device, dtype, out_features, in_features)
