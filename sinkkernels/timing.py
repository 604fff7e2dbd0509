"""Timing a GPU call the way a serving step pays for it: shared by the measured dispatch and the benchmarks."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

L2_FLUSH_BYTES = 256 * 2 ** 20
T = TypeVar("T")


def time_cuda(fn: Callable[[], object], warmup: int, reps: int, graph: bool = True) -> float:
    """Median seconds of `fn` over `reps` runs, each after an L2 flush, timed with CUDA events.

    `graph=True` captures one call in a CUDA graph and times its replay: the GPU's time for the
    call, without the host's launch overhead (what a serving step that replays graphs pays). The
    flush before each run also gives the host time to queue the run, so the events bracket GPU work.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(captured):
                fn()
            run = captured.replay
        except RuntimeError as error:  # a host synchronisation inside fn: time it eagerly, and say so
            print(f"warning: CUDA graph capture failed ({str(error).splitlines()[0]}); timing eagerly",
                  file=sys.stderr)
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_cuda_eager_stream(fn: Callable[[], object], calls: int = 20) -> float:
    """Seconds per call of `calls` back-to-back eager calls, no flush: host launch overhead included."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def time_cpu(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall-clock seconds of `fn` (CPU paths: checks the mechanism, not a performance number)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# aten operators that only make views (no kernel on a GPU); left out of the CPU count
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
    "narrow", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach", "_unsafe_view"))


COMPILED_CALL = "## Call CompiledFxGraph"  # the profiler's event for one call of a torch.compile'd graph


@dataclass(frozen=True)
class DeviceActivity:
    """What the device did during one call (see `profile_call`)."""

    wall_s: float
    busy_s: float  # the union of the work's intervals: overlapping work counts once
    launches: int

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall_s


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: concurrent kernels on several streams, or a
    kernel inside another's span, keep the device busy once, not twice."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def profile_call(fn: Callable[[], T], device: torch.device) -> tuple[T, DeviceActivity]:
    """`fn()`'s result and what the device did while it ran, on every thread (the engine runs its passes
    on a worker thread).

    On CUDA the work is every GPU operation CUPTI saw (kernels, copies, fills; a replayed CUDA graph
    shows its nodes). On a CPU it is the operators called from Python that compute (top-level aten
    ops other than views, and each call of a torch.compile'd graph, one generated kernel), a proxy for
    the kernels a GPU would launch, and their busy time is the
    share of the wall time spent in them rather than in Python. The wall time runs until the device
    is idle, under the profiler (which slows the host): a measurement of its own, not a timing run's.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU],
                 experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        started = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    if cuda:
        work = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        work = [e for e in prof.events() if e.name.startswith(COMPILED_CALL)
                or (e.name.startswith("aten::") and e.cpu_parent is None and e.name not in VIEW_OPS)]
    busy = busy_seconds((e.time_range.start, e.time_range.end) for e in work) / 1e6  # the profiler's microseconds
    return result, DeviceActivity(wall, busy, len(work))


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """What one eager call of `fn` launches (see `profile_call`): GPU operations on CUDA, computing operators
    on a CPU."""
    return profile_call(fn, device)[1].launches
