"""Dispatch measured on the device that serves; the committed table only seeds it.

When a replica loads a 2:4 model on a GPU, `measured_table` times every usable backend on each of the
model's linear shapes at the M values its engine produces (`engine_m_values`), keeps the fastest per
range of M, and caches the plans on disk keyed by device, torch version, dtype, shape, those M values and
the policy, so a later start on the same machine reads them back instead of timing again. A sparse backend
must beat dense by `DENSE_MARGIN` to be chosen: within the timing noise a pruned layer stays on the dense
kernel, never slower than `nn.Linear`. The default policy, `compact`, gives each layer one backend for
every M (`single_representation_steps`), so a layer holds its weight in one form: dense, or compressed
when a sparse backend is never slower than dense; `fastest` allows a different backend per range of M,
at the memory of both forms.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cusparselt import ENV_ALGORITHMS, algorithm_table_digest
from .dispatch import (BACKENDS, TABLE_FORMAT, fastest_steps, forced_backend, single_representation_steps, table_key,
                       unavailable_reason)
from .sparse24 import Sparse24Linear
from .swap import serve_packed_linears, sparse_shapes, swap_sparse_linears
from .testing import random_24_weight
from .timing import time_cpu, time_cuda

DENSE_MARGIN = 0.03
POLICIES = {"compact": single_representation_steps, "fastest": fastest_steps}
ENV_CACHE = "SINKSERVE_DISPATCH_CACHE"
Timer = Callable[[Callable[[], object], int, int], float]


def engine_m_values(max_num_seqs: int, max_tokens_per_step: int, block_length: int = 32) -> list[int]:
    """The rows (M) of the engine's passes: batch x block for dual-cache block passes (batch 1, 2, 4, ...
    up to max_num_seqs) and batch x sequence for full passes (powers of two from 64 to max_tokens_per_step)."""
    batches = sorted({min(2 ** i, max_num_seqs) for i in range(max_num_seqs.bit_length() + 1)})
    full = [2 ** i for i in range(6, max_tokens_per_step.bit_length()) if 2 ** i <= max_tokens_per_step]
    return sorted({b * block_length for b in batches} | set(full))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cache_path(device: torch.device, cache_dir: Path | str | None = None) -> Path:
    base = Path(cache_dir or os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "sinkserve" / "dispatch")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")
    algorithms = algorithm_table_digest() if device.type == "cuda" else None  # cuSPARSELt ids in force
    return base / f"{slug}-torch{torch.__version__}{f'-cusparselt{algorithms}' if algorithms else ''}.json"


@dataclass
class MeasuredTable:
    """Plans per layer shape ({table_key: steps}), where they came from, and what measuring cost."""

    plans: dict[str, list]
    path: Path
    measured: list[str]  # keys timed in this call (the others were read from the cache)
    seconds: float
    policy: str = "compact"

    def summary(self) -> dict:
        return {"plans": self.plans, "policy": self.policy, "cache": str(self.path), "measured_now": self.measured,
                "measure_seconds": round(self.seconds, 3),
                "cusparselt_algorithms": os.environ.get(ENV_ALGORITHMS) or None}


def measure_shape(n: int, k: int, dtype: torch.dtype, device: torch.device, m_values: Iterable[int],
                  backends: Iterable[str] = BACKENDS, timer: Timer | None = None, warmup: int = 3,
                  reps: int = 10) -> dict[int, dict[str, float]]:
    """Seconds of each usable backend on a random 2:4 (n, k) weight at each M."""
    timer = timer or (time_cuda if device.type == "cuda" else time_cpu)
    weight = random_24_weight(n, k, dtype, device, seed=n * 7 + k)
    layers = {b: Sparse24Linear.from_dense(weight, backend=b) for b in backends
              if unavailable_reason(b, device, dtype, n, k) is None}
    times: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for m in m_values:
            x = torch.randn(m, k, device=device).to(dtype)
            times[m] = {b: timer(lambda layer=layer: layer(x), warmup, reps) for b, layer in layers.items()}
    return times


def measured_table(shapes: Iterable[tuple[int, int]], dtype: torch.dtype, device: torch.device | str,
                   m_values: list[int], backends: Iterable[str] = BACKENDS, timer: Timer | None = None,
                   cache_dir: Path | str | None = None, policy: str = "compact") -> MeasuredTable:
    """Plans for `shapes` on this device: read from the cache where it holds them for these M values and
    this policy, measured (and written back) otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"unknown dispatch policy {policy!r}: choose one of {', '.join(POLICIES)}")
    device = torch.device(device)
    path = cache_path(device, cache_dir)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    plans, measured_m = dict(cached.get("plans", {})), dict(cached.get("m_values", {}))
    policies = dict(cached.get("policies", {}))
    started, measured = time.perf_counter(), []
    wanted = sorted(set(m_values))
    for n, k in sorted(set(shapes)):
        key = table_key(device_name(device), dtype, n, k)
        if measured_m.get(key) == wanted and policies.get(key, "fastest") == policy and key in plans:
            continue
        times = measure_shape(n, k, dtype, device, wanted, backends, timer)
        plans[key], measured_m[key], policies[key] = POLICIES[policy](times, DENSE_MARGIN), wanted, policy
        measured.append(key)
    if measured:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"format": TABLE_FORMAT, "plans": plans, "m_values": measured_m,
                                       "policies": policies}, indent=1))
        partial.replace(path)
    keys = {table_key(device_name(device), dtype, n, k) for n, k in shapes}
    return MeasuredTable({key: plans[key] for key in sorted(keys)}, path, measured, time.perf_counter() - started,
                         policy)


def swap_for_serving(model: torch.nn.Module, m_values: list[int], backend: str | None = None
                     ) -> tuple[list[str], MeasuredTable | None]:
    """What a replica does with a 2:4 model: on a GPU, unless a backend is forced, measure the dispatch for
    its shapes at `m_values`; then give each 2:4 layer the form its plan runs from. A 2:4 `nn.Linear` gets
    `Sparse24Linear` where the plan has a sparse backend and stays as it is otherwise; a layer loaded packed
    (`Packed24Linear`) gets `Sparse24Linear` or, for a dense plan, an `nn.Linear` unpacked one layer at a
    time (`serve_packed_linears`). Each Sparse24Linear holds only the form its plan reads (`release_packed`).
    Returns the names given a Sparse24Linear and the measured table (or None)."""
    weight = next(p for p in model.parameters() if p.dim() == 2)
    table = None
    if weight.device.type == "cuda" and forced_backend(backend) is None:
        table = measured_table(sparse_shapes(model), weight.dtype, weight.device, m_values)
    plans = table.plans if table is not None else None
    names = swap_sparse_linears(model, backend=backend, skip_dense=True, table=plans)
    for name in names:  # each layer keeps only the form its plan runs from
        model.get_submodule(name).release_packed()
    return names + serve_packed_linears(model, backend, plans), table
