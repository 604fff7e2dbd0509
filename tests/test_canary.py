"""The canary controller's decisions on known evidence: gates judged only on their minimum
of data, promotion step by step, rollback on the first failed gate, and a saved state that
a restarted router resumes unless the policy or the models changed."""
from __future__ import annotations

import pytest

from serve.decisions.canary import COMPLETE, PROMOTE, ROLLBACK, ROLLED_BACK, CanaryController, StepWindow, judge
from serve.decisions.router_config import CanaryPolicy

MODELS = {"dense": "embedded", "pruned": "runs/pruned"}


class MemoryStore:
    """The GCS store's interface over a dict (the real one is exercised end to end)."""

    def __init__(self):
        self.data = {}

    def load(self, key):
        return self.data.get(key)

    def save(self, key, state):
        self.data[key] = dict(state)

    def delete(self, key):
        self.data.pop(key, None)


def policy(**gates) -> CanaryPolicy:
    return CanaryPolicy(steps=[0.1, 0.5, 1.0], min_requests=4, min_seconds=10, min_pairs=2,
                        gates={"max_error_rate": 0.25, "max_p99_latency_ratio": 2.0, "max_quality_gap": 0.3, **gates})


def feed(controller: CanaryController, ok: int = 4, failed: int = 0, latency: float = 1.0, gaps=(0.0, 0.1)):
    for _ in range(8):
        controller.record_outcome("dense", "ok", 1.0)
    for _ in range(ok):
        controller.record_outcome("pruned", "ok", latency)
    for _ in range(failed):
        controller.record_outcome("pruned", "error", None)
    for gap in gaps:
        controller.record_pair("pruned", gap, 0.9)


def test_gates_wait_for_their_minimum_of_data():
    gates = judge(policy(), StepWindow(ok=3, latencies=[1.0] * 3, gaps=[5.0]), baseline_p99=1.0, cost_ratio=None)
    assert [g.passed for g in gates] == [None, None, None]  # 3 < 4 requests, 1 < 2 pairs: no verdict either way
    gates = judge(policy(), StepWindow(ok=4, latencies=[1.0] * 4, gaps=[0.1, 0.2]), 1.0, None)
    assert all(g.passed for g in gates) and [g.name for g in gates] == ["error_rate", "p99_latency", "quality_gap"]


def test_each_gate_fails_on_its_own_number():
    window = StepWindow(ok=3, failed=1, latencies=[1.0, 1.0, 1.0, 5.0], gaps=[0.1, 0.2], agreements=[0.2, 0.4])
    point = policy(min_agreement=0.5, max_cost_ratio=0.9, confidence_z=0)  # means taken as they are
    verdicts = {g.name: g.passed for g in judge(point, window, 1.0, 1.2)}
    assert verdicts == {"error_rate": True, "p99_latency": False, "quality_gap": True, "agreement": False,
                        "cost": False}


def test_a_mean_must_clear_its_limit_by_two_standard_errors_either_way():
    def gap_verdict(gaps):
        [gate] = [g for g in judge(policy(), StepWindow(ok=4, gaps=gaps), None, None) if g.name == "quality_gap"]
        return gate.passed

    assert gap_verdict([0.1] * 10) is True
    assert gap_verdict([1.0, 1.2]) is False  # 1.1 ± 0.1: clearly over 0.3
    # noisy pairs whose mean (0.41) is over the limit but within two standard errors (2 x 0.12) of it:
    # neither a promotion nor a rollback, the step keeps measuring (a real run rolled back a good
    # artifact on such a mean before this rule)
    assert gap_verdict([0.9, 0.1, 0.6, 0.5, 0.2, 0.8, 0.1, 0.1]) is None
    errors = judge(policy(), StepWindow(ok=9, failed=1), None, None)[0]
    assert errors.name == "error_rate" and errors.value == 0.1 and errors.passed is None  # 1 of 10: too few to tell


def test_promotes_step_by_step_then_completes():
    store = MemoryStore()
    canary = CanaryController(policy(), MODELS, store, "k", leader=True, now=0.0)
    assert canary.weights() == {"dense": 0.9, "pruned": 0.1}
    feed(canary)
    assert canary.tick(5.0, None) is None  # every gate holds but the step is younger than min_seconds
    decision = canary.tick(10.0, None)
    assert decision.decision == PROMOTE and decision.reason == "gates_held" and canary.weight == 0.5
    assert canary.tick(30.0, None) is None  # a new step starts with no evidence
    feed(canary)
    assert canary.tick(30.0, None).decision == PROMOTE and canary.weight == 1.0
    feed(canary)
    assert canary.tick(40.0, None).decision == "complete" and canary.state.status == COMPLETE
    assert canary.tick(50.0, None) is None and canary.weight == 1.0
    assert [d["decision"] for d in store.data["k"]["decisions"]] == ["promote", "promote", "complete"]


def test_a_failed_gate_rolls_back_at_once_and_stays_back():
    canary = CanaryController(policy(), MODELS, MemoryStore(), "k", leader=True, now=0.0)
    feed(canary, gaps=(2.0, 3.0))  # answers the dense model finds far less likely
    decision = canary.tick(1.0, None)  # before min_seconds: a failure needs no waiting
    assert decision.decision == ROLLBACK and decision.reason == "quality_gap"
    assert canary.weights() == {"dense": 1.0, "pruned": 0.0} and canary.state.status == ROLLED_BACK
    feed(canary, gaps=(0.0, 0.0))
    assert canary.tick(100.0, None) is None and canary.weight == 0.0
    assert "quality_gap=2.5" in decision.describe()


def test_errors_roll_back_and_other_variants_do_not_count():
    canary = CanaryController(policy(), MODELS, MemoryStore(), "k", leader=True, now=0.0)
    for _ in range(20):
        canary.record_outcome("other", "error", None)
    feed(canary, ok=2, failed=10)
    assert canary.tick(20.0, None).reason == "error_rate"


def test_a_restarted_router_resumes_and_a_new_policy_or_model_starts_over():
    store = MemoryStore()
    canary = CanaryController(policy(), MODELS, store, "k", leader=True, now=0.0)
    feed(canary)
    canary.tick(10.0, None)
    again = CanaryController(policy(), MODELS, store, "k", leader=True, now=99.0)
    assert again.resumed and again.weight == 0.5 and again.state.step_started == 10.0
    retrained = CanaryController(policy(), {**MODELS, "pruned": "runs/pruned-v2"}, store, "k", leader=True, now=99.0)
    assert not retrained.resumed and retrained.weight == 0.1
    changed = CanaryController(policy(max_quality_gap=0.1), MODELS, MemoryStore(), "k", leader=True, now=0.0)
    assert changed.state.fingerprint != canary.state.fingerprint


def test_followers_apply_the_leaders_decisions_and_decide_nothing():
    store = MemoryStore()
    leader = CanaryController(policy(), MODELS, store, "k", leader=True, now=0.0)
    follower = CanaryController(policy(), MODELS, store, "k", leader=False, now=0.0)
    feed(follower, gaps=(5.0, 5.0))
    assert follower.tick(50.0, None) is None and follower.weight == 0.1  # bad evidence, but not its call
    feed(leader)
    leader.tick(10.0, None)
    follower.tick(11.0, None)
    assert follower.weight == 0.5


@pytest.mark.parametrize("steps", [[0.5, 0.25], [0.0, 1.0], [0.5, 0.5], [1.5]])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        CanaryPolicy(steps=steps)
