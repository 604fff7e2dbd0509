"""Driving load: arrivals on a schedule (open loop), at most N in flight (closed loop), or
both at once, as vLLM's `--request-rate` with `--max-concurrency`; always bounded by a
request count and a wall-clock limit, so a run stops by itself."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from tqdm.auto import tqdm

from loadtest.arrivals import arrival_offsets
from loadtest.client import RequestRecord

SendFn = Callable[[RequestRecord, float], Awaitable[RequestRecord]]


@dataclass
class Phase:
    """One point of a sweep: `rate` (requests/s, open loop) and/or `concurrency` (the most
    requests in flight; alone, a closed loop: everything arrives at once and waits its turn)."""

    count: int
    max_seconds: float
    rate: float | None = None
    concurrency: int | None = None
    burstiness: float = 1.0
    seed: int = 0

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency={self.concurrency}"
        cap = f",max-concurrency={self.concurrency}" if self.concurrency else ""
        return f"rate={self.rate:g}/s{cap}"


async def run_phase(phase: Phase, make_record: Callable[[int], RequestRecord], send: SendFn,
                    progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Run one phase; returns every record (failed ones included) and the phase duration.
    Requests not yet sent when the time limit hits (not arrived, or waiting for a free
    slot) are not sent; in-flight ones finish."""
    start = time.perf_counter()
    deadline = start + phase.max_seconds
    bar = tqdm(total=phase.count, desc=phase.label, disable=not progress, unit="req")
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(phase.concurrency) if phase.concurrency else contextlib.nullcontext()

    async def one(index: int) -> None:
        async with slots:
            if time.perf_counter() > deadline:
                return
            record = await send(make_record(index), start)
        records.append(record)
        bar.update(1)

    rate = float("inf") if phase.rate is None else phase.rate
    tasks = []
    for index, offset in enumerate(arrival_offsets(rate, phase.count, phase.burstiness, phase.seed)):
        if start + offset > deadline:
            break
        wait = start + offset - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    bar.close()
    records.sort(key=lambda r: r.index)
    return records, time.perf_counter() - start
