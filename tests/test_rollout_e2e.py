"""End to end: the router decides. A second Serve application beside the shared one (dense,
the good 2:4 artifact, and a collapsed one) runs a canary policy with paired quality checks
and live cost, on real HTTP with a real Prometheus: the good artifact is promoted through
every step, a restarted router resumes where the rollout stood, and the collapsed artifact
is rolled back by the quality gate."""
from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest

from tests.e2e import make_collapsed, wait_until
from tests.test_deploy import dashboard_exprs, recording_rules
from tests.test_deploy_e2e import local_prometheus, reads_decisions
from tests.test_serve_e2e import post, replica_pids, settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
APP = "rollout"
PROMPTS = ["The table", "Once upon a time", "The king said", "In the morning the", "She opened the door and",
           "The history of", "A small village", "The number of"]


def rollout_args(candidate: str, pruned: str, collapsed: str) -> dict:
    variant = {"num_cpus": 0.25}  # three more model replicas beside the shared app's two, on 2 CPUs
    return {
        "variants": {"dense": {"model": "embedded", **variant}, "pruned": {"model": pruned, **variant},
                     "bad": {"model": collapsed, **variant}},
        "max_tokens": 32, "max_concurrent_requests": 24,
        "quality": {"sample_rate": 1.0, "samples": 8, "max_busy": 1},
        "cost": {"cpu_replica_hour": 0.1, "window_s": 600},  # long: both variants keep a cost to compare
        "canary": {"variant": candidate, "baseline": "dense", "steps": [0.25, 0.5, 1.0], "min_requests": 4,
                   "min_seconds": 2, "min_pairs": 4,
                   "gates": {"max_error_rate": 0.1, "max_p99_latency_ratio": 4.0, "max_quality_gap": 0.8}},
    }


def deploy(args: dict) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")


@pytest.fixture(scope="module")
def rollout(app, tmp_path_factory):
    """The rollout app, and a Prometheus loaded with deploy/'s rules (test_deploy_e2e's) beside the
    test's own."""
    from ray import serve

    collapsed = make_collapsed(tmp_path_factory.mktemp("collapsed"))
    args = lambda candidate: rollout_args(candidate, app.pruned, collapsed)  # noqa: E731
    deploy(args("pruned"))
    try:
        with local_prometheus(app.metrics_url, tmp_path_factory.mktemp("prometheus-rules")) as api:
            yield SimpleNamespace(url=f"{app.base_url}/{APP}", query=app.query, args=args, rules_api=api)
    finally:
        serve.delete(APP)


class Traffic:
    """Two clients sending small seeded completions as distinct users until stopped."""

    def __init__(self, url: str):
        self.url, self.results, self.sent, self.refused = url, [], 0, []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _client(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i, self.sent = self.sent, self.sent + 1
            status, variant, text = post(self.url, {"model": "sinkserve", "prompt": PROMPTS[i % len(PROMPTS)],
                                                    "max_tokens": 16, "steps": 16, "user": f"rollout-{i}",
                                                    **({"seed": i} if i % 2 else {})})  # unseeded: 53-bit
            with self.lock:
                self.results.append((status, variant))
                if status != 200:
                    self.refused.append(text)
                    self.stop.set()

    def done(self, check) -> bool:
        """`check()`, once every request so far was answered (a refusal fails the test at once)."""
        assert not self.refused, self.refused[0]
        return check()

    def __enter__(self) -> "Traffic":
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(2)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def decisions(query, variant: str) -> dict[tuple[str, str], float]:
    promql = (f'sum by (decision, reason) (ray_sinkserve_canary_decisions_total{{application="{APP}", '
              f'variant="{variant}"}})')
    return {(json.loads(k)["decision"], json.loads(k)["reason"]): v for k, v in query(promql).items()}


def gauge(query, name: str, variant: str) -> float | None:
    values = query(f'avg(ray_sinkserve_{name}{{application="{APP}", variant="{variant}"}})')
    return next(iter(values.values()), None)


def mean_gap(query, variant: str) -> float:
    """The exact mean quality gap from Prometheus (Ray's histogram _sum is built from bucket midpoints)."""
    where = f'application="{APP}", variant="{variant}"'
    part = lambda sign: f'sum(ray_sinkserve_quality_nll_gap_exact_sum_nats_total{{{where}, sign="{sign}"}})'  # noqa: E731
    promql = (f'(({part("positive")} or vector(0)) - ({part("negative")} or vector(0))) / '
              f'sum(ray_sinkserve_quality_nll_gap_nats_count{{{where}}})')
    return next(iter(query(promql).values()))


def rollout_status(url: str) -> dict:
    with urllib.request.urlopen(url + "/rollout", timeout=30) as response:
        return json.loads(response.read())


def served(url: str, n: int, tag: str) -> Counter:
    return Counter(post(url, {"model": "sinkserve", "prompt": "The table", "max_tokens": 4, "steps": 4,
                              "user": f"{tag}-{i}"})[1]
                   for i in range(n))


def test_a_good_artifact_is_promoted_and_a_restarted_router_resumes(rollout):
    query = rollout.query
    with Traffic(rollout.url) as traffic:
        wait_until(lambda: traffic.done(lambda: ("complete", "gates_held") in decisions(query, "pruned")), 600,
                   "the canary to complete the rollout of pruned")
    assert decisions(query, "pruned") == {("promote", "gates_held"): 2, ("complete", "gates_held"): 1}
    assert all(status == 200 for status, _ in traffic.results)
    # the candidate's share grew: the last requests all went to pruned, the first ones mostly to dense
    first, last = Counter(v for _, v in traffic.results[:8]), Counter(v for _, v in traffic.results[-6:])
    assert first["dense"] > first["pruned"] and last == Counter({"pruned": 6}), (first, last)
    assert gauge(query, "canary_weight", "pruned") == 1.0
    status = rollout_status(rollout.url)  # the router says the same, with the numbers each decision read
    assert status["weights"] == {"bad": 0.0, "dense": 0.0, "pruned": 1.0} and status["canary"]["status"] == "complete"
    assert [d["decision"] for d in status["canary"]["decisions"]] == ["promote", "promote", "complete"]
    assert all(gate["passed"] for d in status["canary"]["decisions"] for gate in d["gates"])
    # quality checks ran on live traffic, the gap is small, and cost per token is exported per variant
    pairs = query(f'sum by (outcome) (ray_sinkserve_quality_pairs_total{{application="{APP}", variant="pruned"}})')
    assert sum(pairs.values()) >= 12, pairs
    assert abs(mean_gap(query, "pruned")) < 0.8
    # every scored check is in the gap histogram, negative gaps included (Ray drops values <= 0)
    where = f'application="{APP}", variant="pruned"'
    scored, counted = settled(lambda: (query(f'sum(ray_sinkserve_quality_pairs_total{{{where}, outcome="scored"}})'),
                                       query(f'sum(ray_sinkserve_quality_nll_gap_nats_count{{{where}}})')))
    assert list(scored.values()) == list(counted.values()), (scored, counted)
    assert gauge(query, "cost_per_million_output_tokens", "pruned") > 0
    # the router's outcome counts equal the client's, per variant (quality-check copies are not in them)
    client = Counter(variant for status, variant in traffic.results if status == 200)
    promql = f'sum by (variant) (ray_sinkserve_requests_total{{application="{APP}", status="ok"}})'
    server = settled(lambda: {json.loads(k)["variant"]: v for k, v in query(promql).items()})
    assert server == {v: float(n) for v, n in client.items()}

    check_decision_rules_and_panels(rollout.rules_api)

    old = replica_pids("ABRouter", APP)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (new := replica_pids("ABRouter", APP)) and set(new).isdisjoint(old)
               and post(rollout.url, {"model": "sinkserve", "prompt": "x", "max_tokens": 2, "steps": 2})[0] == 200,
               180, "a new router replica")
    # a fresh rollout would start at 25%: the restarted router resumed the completed one
    assert served(rollout.url, 8, "after-restart") == Counter({"pruned": 8})


def test_a_collapsed_artifact_is_rolled_back_by_the_quality_gate(rollout):
    deploy(rollout.args("bad"))  # a new policy (another candidate): a new rollout, from the first step
    query = rollout.query
    with Traffic(rollout.url) as traffic:
        wait_until(lambda: traffic.done(lambda: ("rollback", "quality_gap") in decisions(query, "bad")), 600,
                   "the quality gate to roll bad back")
    assert decisions(query, "bad") == {("rollback", "quality_gap"): 1}
    assert all(status == 200 for status, _ in traffic.results)
    wait_until(lambda: gauge(query, "canary_weight", "bad") == 0.0, 60, "the canary weight of bad at 0")
    assert "bad" not in served(rollout.url, 8, "after-rollback")
    [decision] = rollout_status(rollout.url)["canary"]["decisions"]
    [gate] = [g for g in decision["gates"] if g["name"] == "quality_gap"]
    assert decision["weight_after"] == 0.0 and gate["passed"] is False and gate["value"] > 0.8
    assert mean_gap(query, "bad") > 0.8


def check_decision_rules_and_panels(api) -> None:
    """deploy/'s rules and dashboard panels on the decision series (which test_deploy_e2e leaves
    to this module) all answer, from the rollout just run."""
    records = [record for record in recording_rules() if reads_decisions(record)]
    panels = {where: expr for where, expr in dashboard_exprs(rate_interval="5m").items() if reads_decisions(expr)}
    assert len(records) >= 4 and len(panels) >= 6

    def missing() -> list[str]:
        empty = [r for r in records if not [x for x in api("query", query=r)["result"] if x["value"][1] != "NaN"]]
        return empty + [where for where, expr in panels.items() if not api("query", query=expr)["result"]]

    wait_until(lambda: not missing(), 120, "every decision rule and panel to answer")
    gap = api("query", query='variant:sinkserve_quality_nll_gap:mean_rate5m{variant="pruned"}')["result"]
    assert gap and float(gap[0]["value"][1]) < 0.8
