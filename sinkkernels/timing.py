"""Timing a GPU call the way a serving step pays for it: shared by the measured dispatch and the benchmarks."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2 ** 20


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


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """What one eager call of `fn` launches: GPU kernels on CUDA; on a CPU, the operators called from Python
    that compute (top-level aten ops other than views), a proxy for the kernels a GPU would launch."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in VIEW_OPS)
