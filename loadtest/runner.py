"""Driving load: open loop (arrivals on a schedule) or closed loop (fixed concurrency),
always bounded by a request count and a wall-clock limit, so a run stops by itself."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from tqdm.auto import tqdm

from loadtest.arrivals import arrival_offsets
from loadtest.client import RequestRecord

SendFn = Callable[[RequestRecord, float], Awaitable[RequestRecord]]


@dataclass
class Phase:
    """One point of a sweep: `rate` (open loop, requests/s) or `concurrency` (closed loop)."""

    count: int
    max_seconds: float
    rate: float | None = None
    concurrency: int | None = None
    burstiness: float = 1.0
    seed: int = 0

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate is not None else f"concurrency={self.concurrency}"


async def run_phase(phase: Phase, make_record: Callable[[int], RequestRecord], send: SendFn,
                    progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Run one phase; returns every record (failed ones included) and the phase duration.
    Requests not yet sent when the time limit hits are not sent; in-flight ones finish."""
    start = time.perf_counter()
    deadline = start + phase.max_seconds
    bar = tqdm(total=phase.count, desc=phase.label, disable=not progress, unit="req")
    records: list[RequestRecord] = []

    async def one(index: int) -> None:
        record = await send(make_record(index), start)
        records.append(record)
        bar.update(1)

    if phase.rate is not None:
        tasks = []
        for index, offset in enumerate(arrival_offsets(phase.rate, phase.count, phase.burstiness, phase.seed)):
            wait = start + offset - time.perf_counter()
            if start + offset > deadline:
                break
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    else:
        counter = iter(range(phase.count))

        async def worker() -> None:
            for index in counter:
                if time.perf_counter() > deadline:
                    return
                await one(index)

        await asyncio.gather(*(worker() for _ in range(phase.concurrency or 1)))
    bar.close()
    records.sort(key=lambda r: r.index)
    return records, time.perf_counter() - start
