"""When requests are sent: open-loop arrival schedules, as vLLM's serving benchmark draws them."""
from __future__ import annotations

import random


def arrival_offsets(rate: float, count: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `count` requests at `rate` per second.

    Inter-arrival gaps are gamma-distributed with mean 1/rate and shape
    `burstiness` (1.0 is a Poisson process; below 1 is burstier, above 1
    smoother, `inf` evenly spaced as in vLLM). `rate=inf` sends everything at once.
    """
    if rate <= 0 or burstiness <= 0 or count < 0:
        raise ValueError("rate and burstiness must be > 0 and count >= 0")
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += 1.0 / rate if burstiness == float("inf") else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return offsets
