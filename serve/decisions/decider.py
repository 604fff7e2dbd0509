"""`Decisions`: every A/B decision of one router replica, as a plain object (no Ray, no HTTP),
so how a variant is chosen can be read and tested without the ingress around it.

It chooses a variant (weighted, sticky, or away from a variant that is down), says where a
request goes when its replica died, records every outcome (Prometheus, the canary's evidence,
the cost's tokens), starts sampled quality pairs, and on each tick exports the live cost and
lets the canary promote or roll back (docs/ROLLOUT.md). The ingress translates HTTP into
calls on it; the replicas, the metrics and the canary's store are handed in.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Protocol

from serve.decisions.canary import CanaryController
from serve.decisions.cost import TokenRate, cost_per_million, replica_hour_price
from serve.decisions.quality import PairResult, QualityChecker
from serve.decisions.router_config import RouterSettings
from serve.decisions.routing import Router, RoutingConfig
from serve.decisions.variant_health import VariantHealth

log = logging.getLogger("ray.serve")


class Replicas(Protocol):
    """The variants' replicas, as the decisions need them (the ingress wraps Serve's handles)."""

    def info(self, variant: str) -> Awaitable[dict]: ...

    def shadow(self, variant: str, payload: dict, max_busy: int) -> Awaitable[dict]: ...

    def score(self, variant: str, payload: dict, answers: list[dict], samples: int, seed: int,
              max_busy: int) -> Awaitable[dict]: ...


class Decisions:
    """`specs`: each variant's model, device and replica count (the cost, and what identifies a
    canary rollout); `metrics`: `serve.metrics.RouterMetrics` or a stand-in; `store` keeps the
    canary's state under `key` (Ray's GCS in the ingress)."""

    def __init__(self, specs: dict[str, dict], replicas: Replicas, metrics, store, key: str,
                 probe_timeout_s: float = 5.0, settings: RouterSettings | None = None):
        self.specs, self.variants = specs, sorted(specs)
        self.metrics, self.store, self.key, self.leader = metrics, store, key, True
        self.health = VariantHealth(replicas.info, self.variants, probe_timeout_s,
                                    on_down=lambda v: metrics.variant_down.inc(1, tags={"variant": v}))
        self.quality = QualityChecker(self.variants, replicas, self._on_pair)
        self.canary: CanaryController | None = None
        self.tokens = TokenRate(60.0, time.monotonic())
        self.configure(settings or RouterSettings())

    # ---- configuration (live, from the router's user_config) --------------------------

    def configure(self, settings: RouterSettings, leader: bool | None = None) -> None:
        """Routing, quality checks, prices and the canary; the leader (router replica 0) decides
        the canary, the others follow its saved state."""
        if leader is not None:
            self.leader = leader
        settings.check_variants(self.variants)
        self.settings = settings
        self.tokens.window_s = settings.cost.window_s
        if settings.canary is None:
            if self.canary is not None and self.leader:
                self.store.delete(self.key)  # a manual deploy without a canary ends the rollout
            self.canary = None
        elif self.canary is None or self.canary.policy != settings.canary:
            models = {v: spec["model"] for v, spec in self.specs.items()}
            self.canary = CanaryController(settings.canary, models, self.store, self.key, self.leader, time.time())
            log.info("canary %s: %s at %.0f%%", "resumed" if self.canary.resumed else "started",
                     settings.canary.variant, 100 * self.canary.weight)
        if self.canary is not None:
            self.canary.leader = self.leader
        self._route()
        self.quality.configure(settings.quality, settings.quality_rate(),
                               settings.canary.variant if settings.canary else None)

    def _route(self) -> None:
        weights = self.canary.weights() if self.canary else self.settings.weights
        weights = {**{v: 0.0 for v in self.variants}, **weights} if weights else {v: 1.0 for v in self.variants}
        self.router = Router(RoutingConfig(weights, self.settings.sticky, self.settings.salt))
        log.info("routing: %s", self.router.config)

    # ---- choosing a variant and failing over -----------------------------------------

    def choose(self, user: str | None) -> str:
        """The variant for a request that names none: by weight, sticky per user, away from a
        variant that is down (counted as a fallback)."""
        variant, fallback = self.router.choose(user, self.health.down)
        self.metrics.assignments.inc(1, tags={"variant": variant})
        if fallback:
            self.metrics.fallbacks.inc(1, tags={"variant": variant})
        return variant

    def other(self, variant: str) -> str | None:
        others = [v for v in self.variants if v != variant and v not in self.health.down]
        return others[0] if others else None

    async def failover(self, variant: str, forced: bool) -> str | None:
        """Where a request goes after its replica died: a live replica of the same variant if
        its health probe answers, else (unless forced) another variant; None: nowhere."""
        if await self.health.check(variant):
            self.metrics.retries.inc(1, tags={"variant": variant})
            return variant
        if not forced and (other := self.other(variant)):
            self.metrics.fallbacks.inc(1, tags={"variant": other})
            return other
        return None

    async def probe(self) -> dict[str, object]:
        """Every variant's health probe (updating which are down): its answer, or None."""
        infos = await asyncio.gather(*(self.health.check(v) for v in self.variants))
        return dict(zip(self.variants, infos))

    # ---- what happened ------------------------------------------------------------------

    def record(self, variant: str | None, status: str, started: float, output: dict | None = None) -> None:
        """One user request's outcome (`started`: its time.monotonic()): Prometheus, the canary's
        evidence and the cost's tokens. `variant` None: refused before one was chosen."""
        self.metrics.outcome(variant, status)
        if variant is None:
            return
        if self.canary is not None:
            self.canary.record_outcome(variant, status, time.monotonic() - started if status == "ok" else None)
        if output is not None:
            self.tokens.add(variant, output["usage"]["completion_tokens"], time.monotonic())

    def answered(self, variant: str, payload: dict, output: dict) -> None:
        """A user's answer has gone back: a sampled one gets its quality pair, in the background."""
        self.quality.maybe_check(variant, payload, output)

    def _on_pair(self, result: PairResult) -> None:
        self.metrics.quality_pair(result.candidate, result.outcome, result.gap, result.agreement)
        if result.copied_to:
            self.metrics.shadow.inc(1, tags={"variant": result.copied_to})
        if self.canary is not None and result.agreement is not None:
            self.canary.record_pair(result.candidate, result.gap, result.agreement)

    # ---- the periodic work: live cost and the canary -----------------------------------

    async def tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # never let a bug here stop the loop (or touch a request)
                log.exception("router tick failed")
            await asyncio.sleep(self.settings.tick_s)

    def live_cost(self) -> dict[str, float]:
        """Each priced variant's cost per million output tokens over the cost window; a variant
        that served nothing has no cost per token, so no entry."""
        now, prices = time.monotonic(), self.settings.cost
        costs = {}
        for variant, spec in self.specs.items():
            hourly = replica_hour_price(spec["device"], prices.cpu_replica_hour, prices.gpu_replica_hour)
            cost = cost_per_million(self.tokens.rate(variant, now), hourly * spec["num_replicas"])
            if cost is not None and hourly > 0:
                costs[variant] = cost
        return costs

    def tick(self) -> None:
        costs = self.live_cost()
        for variant, cost in costs.items():
            self.metrics.cost.set(cost, tags={"variant": variant})
        if self.canary is None:
            return
        policy = self.canary.policy
        ratio = costs[policy.variant] / costs[policy.baseline] \
            if policy.variant in costs and policy.baseline in costs else None
        weight = self.canary.weight
        decision = self.canary.tick(time.time(), ratio)
        if decision is not None:
            log.warning("%s", decision.describe())
            self.metrics.canary_decisions.inc(1, tags={"variant": policy.variant, "decision": decision.decision,
                                                       "reason": decision.reason})
        if decision is not None or self.canary.weight != weight:
            self._route()
        self.metrics.canary_weight.set(self.canary.weight, tags={"variant": policy.variant})

    def status(self) -> dict:
        """The live decision: weights, quality checks, the canary's state and recent decisions."""
        quality = {"sample_rate": self.quality.rate, "reference": self.settings.quality.reference,
                   "candidate": self.quality.candidate}
        return {"weights": self.router.config.weights, "quality": quality,
                "canary": self.canary.status() if self.canary else None}
