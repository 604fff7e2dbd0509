"""Live cost per million output tokens: what a variant's replicas cost per hour, divided
by the output tokens they served over a recent window (user traffic only: quality-check
copies are left out). An idle variant still costs its price, so its cost per token rises
as its traffic falls; that is the bill, not the cost at full load (the load-test report
gives that one)."""
from __future__ import annotations

from collections import deque


def cost_per_million(tokens_per_s: float, price_per_hour: float) -> float | None:
    """Price of a million output tokens at `tokens_per_s`; None when nothing was served."""
    return price_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else None


def replica_hour_price(device: str, cpu_price: float, gpu_price: float) -> float:
    return gpu_price if device.startswith("cuda") else cpu_price


class TokenRate:
    """Output tokens per second of each variant over the last `window_s` seconds."""

    def __init__(self, window_s: float, started: float):
        self.window_s = window_s
        self.started = started  # a window younger than `window_s` is divided by its own age
        self.events: dict[str, deque[tuple[float, int]]] = {}

    def add(self, variant: str, tokens: int, now: float) -> None:
        self.events.setdefault(variant, deque()).append((now, tokens))

    def rate(self, variant: str, now: float) -> float:
        events = self.events.get(variant, deque())
        while events and events[0][0] < now - self.window_s:
            events.popleft()
        span = min(self.window_s, now - self.started)
        return sum(tokens for _, tokens in events) / span if span > 0 else 0.0
