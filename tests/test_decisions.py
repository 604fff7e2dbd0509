"""`serve.decisions.Decisions` on its own: no Ray, no HTTP; fake replicas, metrics and store."""
from __future__ import annotations

import asyncio
import time

import pytest

from serve.decisions import Decisions
from serve.decisions.router_config import RouterSettings

SPECS = {v: {"model": v, "device": "cpu", "num_replicas": 1} for v in ("dense", "pruned")}
OUTPUT = {"token_ids": [1, 2, 3], "finish_reason": "length", "seed": 7, "usage": {"completion_tokens": 3}}


class Series:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def inc(self, value, tags):
        self.log.append((self.name, value, tags))

    set = observe = inc


class Metrics:
    """Records what `Decisions` counts, in the calls `serve.metrics.RouterMetrics` takes."""

    def __init__(self):
        self.log: list = []

    def __getattr__(self, name: str) -> Series:
        return Series(self.log, name)

    def outcome(self, variant, status):
        self.log.append(("requests", 1, {"variant": variant or "none", "status": status}))

    def quality_pair(self, variant, outcome, gap, agreement):
        self.log.append(("quality_pairs", 1, {"variant": variant, "outcome": outcome}))

    def named(self, name: str) -> list:
        return [(value, tags) for logged, value, tags in self.log if logged == name]


class Replicas:
    def __init__(self, down=()):
        self.down, self.calls = set(down), []

    async def info(self, variant):
        if variant in self.down:
            raise ConnectionError(variant)
        return {"waiting": 0, "running": 0}

    async def shadow(self, variant, payload, max_busy):
        self.calls.append(("shadow", variant, payload["seed"]))
        return {"type": "finished", "output": {**OUTPUT, "token_ids": [1, 2, 4]}}

    async def score(self, variant, payload, answers, samples, seed, max_busy):
        self.calls.append(("score", variant, seed))
        return {"type": "scored", "nll": [1.0, 1.25]}


class Store(dict):
    def load(self, key):
        return self.get(key)

    def save(self, key, state):
        self[key] = state

    def delete(self, key):
        self.pop(key, None)


def decisions(settings: dict | None = None, replicas: Replicas | None = None, store: Store | None = None):
    return Decisions(SPECS, replicas or Replicas(), Metrics(), store if store is not None else Store(), "canary:t",
                     probe_timeout_s=0.5, settings=RouterSettings.model_validate(settings or {}))


def test_choose_follows_the_weights_sticks_to_a_user_and_counts_the_assignment():
    d = decisions({"weights": {"pruned": 1.0}})
    assert {d.choose(None) for _ in range(20)} == {"pruned"}
    d.configure(RouterSettings(weights={"dense": 1.0, "pruned": 1.0}))
    assert len({d.choose("alice") for _ in range(20)}) == 1
    assert {"variant": "pruned"} in [tags for _, tags in d.metrics.named("assignments")]


def test_a_variant_that_is_down_is_avoided_and_counted_as_a_fallback():
    d = decisions({"weights": {"pruned": 1.0}}, Replicas(down={"pruned"}))
    assert asyncio.run(d.probe()) == {"dense": {"waiting": 0, "running": 0}, "pruned": None}
    assert d.choose(None) == "dense"
    assert d.metrics.named("fallbacks") == [(1, {"variant": "dense"})]
    assert d.metrics.named("variant_down") == [(1, {"variant": "pruned"})]


def test_failover_retries_a_live_variant_else_the_other_unless_forced():
    assert asyncio.run(decisions().failover("dense", forced=False)) == "dense"  # its probe answers: same variant
    d = decisions(replicas=Replicas(down={"dense"}))
    assert asyncio.run(d.failover("dense", forced=False)) == "pruned"
    assert d.metrics.named("fallbacks") == [(1, {"variant": "pruned"})]
    assert asyncio.run(decisions(replicas=Replicas(down={"dense"})).failover("dense", forced=True)) is None
    both_down = decisions(replicas=Replicas(down={"dense", "pruned"}))

    async def after_a_probe():
        await both_down.probe()
        return await both_down.failover("dense", forced=False)

    assert asyncio.run(after_a_probe()) is None


def test_every_outcome_is_counted_and_its_tokens_make_the_live_cost():
    d = decisions({"cost": {"cpu_replica_hour": 1.0}})
    d.record(None, "invalid", time.monotonic())
    d.record("dense", "ok", time.monotonic(), OUTPUT)
    assert d.metrics.named("requests") == [(1, {"variant": "none", "status": "invalid"}),
                                           (1, {"variant": "dense", "status": "ok"})]
    costs = d.live_cost()
    assert list(costs) == ["dense"] and costs["dense"] > 0  # pruned served nothing: no cost per token
    d.tick()
    assert [tags for _, tags in d.metrics.named("cost")] == [{"variant": "dense"}]


def test_a_sampled_answer_gets_its_quality_pair():
    replicas = Replicas()
    d = decisions({"shadow": True}, replicas)

    async def answer():
        d.answered("dense", {"prompt": "x", "seed": None}, OUTPUT)
        await asyncio.gather(*d.quality.tasks)

    asyncio.run(answer())
    assert replicas.calls == [("shadow", "pruned", 7), ("score", "dense", 7)]
    assert d.metrics.named("quality_pairs") == [(1, {"variant": "pruned", "outcome": "scored"})]
    assert d.metrics.named("shadow") == [(1, {"variant": "pruned"})]
    assert d.status()["quality"] == {"sample_rate": 1.0, "reference": "dense", "candidate": "pruned"}


def test_the_canary_sets_the_weights_rolls_back_on_errors_and_a_deploy_without_it_ends_it():
    store = Store()
    policy = {"steps": [0.25, 1.0], "min_requests": 2, "min_seconds": 0, "gates": {"confidence_z": 0}}
    d = decisions({"canary": policy}, store=store)
    assert d.status()["weights"] == {"dense": 0.75, "pruned": 0.25} and "canary:t" in store
    for _ in range(3):
        d.record("pruned", "error", time.monotonic())
    d.tick()
    assert d.status()["canary"]["status"] == "rolled_back"
    assert d.status()["weights"] == {"dense": 1.0, "pruned": 0.0}
    assert [tags["decision"] for _, tags in d.metrics.named("canary_decisions")] == ["rollback"]
    d.configure(RouterSettings())
    assert d.canary is None and "canary:t" not in store and d.status()["canary"] is None


def test_a_follower_never_decides_the_canary_and_names_must_be_deployed():
    store = Store()
    d = decisions({"canary": {"steps": [0.5, 1.0], "min_requests": 1, "min_seconds": 0}}, store=store)
    d.configure(d.settings, leader=False)
    assert not d.canary.leader
    d.record("pruned", "ok", time.monotonic(), OUTPUT)
    d.tick()
    assert d.metrics.named("canary_decisions") == []
    with pytest.raises(ValueError, match="unknown variants"):
        d.configure(RouterSettings(weights={"sparse": 1.0}))


def test_the_stand_in_records_only_what_router_metrics_has():
    """Every series `Decisions` counted above exists on `serve.metrics.RouterMetrics` (built without Ray)."""
    from serve.metrics import RouterMetrics

    d = decisions({"shadow": True, "cost": {"cpu_replica_hour": 1.0}}, Replicas(down={"pruned"}))
    asyncio.run(d.probe())
    d.choose(None)
    d.record("dense", "ok", time.monotonic(), OUTPUT)
    d.tick()
    assert {name for name, _, _ in d.metrics.log} <= set(vars(RouterMetrics()))
