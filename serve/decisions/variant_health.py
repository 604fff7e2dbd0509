"""Which variants are down, decided only by health probes.

A failed request never marks a variant down by itself (one client's bad input must
not move other users). When a replica call fails in a way that means the replica
process is gone, the router asks for a probe: the variant's `info()` answered by
any live replica of it within `timeout_s`. A variant whose probe fails is down
until a later probe (every `interval_s` while it is down) succeeds.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("ray.serve")

Probe = Callable[[str], Awaitable[object]]


class VariantHealth:
    def __init__(self, probe: Probe, variants: list[str], timeout_s: float = 5.0, interval_s: float = 2.0,
                 on_down: Callable[[str], None] | None = None):
        self._probe = probe
        self.variants = list(variants)
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self._on_down = on_down or (lambda variant: None)
        self._down: set[str] = set()
        self._watchers: dict[str, asyncio.Task] = {}

    @property
    def down(self) -> frozenset[str]:
        return frozenset(self._down)

    async def check(self, variant: str):
        """Probe `variant` now; mark it down (and watch for its return) or up. Returns what
        the probe answered (truthy), or None when it failed."""
        try:
            answer = await asyncio.wait_for(self._probe(variant), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure to answer is a failed probe
            if variant not in self._down:
                log.warning("variant %s is down: its health probe failed (%r)", variant, err)
                self._down.add(variant)
                self._on_down(variant)
            self._watch(variant)
            return None
        if variant in self._down:
            log.info("variant %s is up again", variant)
        self._down.discard(variant)
        return answer or True

    def _watch(self, variant: str) -> None:
        task = self._watchers.get(variant)
        if task is None or task.done():
            self._watchers[variant] = asyncio.get_running_loop().create_task(self._until_up(variant))

    async def _until_up(self, variant: str) -> None:
        while variant in self._down:
            await asyncio.sleep(self.interval_s)
            await self.check(variant)
