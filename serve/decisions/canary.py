"""The canary controller: moves a candidate variant (the pruned one) through traffic steps
on live numbers, and rolls it back to 0% the moment one gate fails.

Each step's evidence is gathered from that step alone (the candidate's outcomes,
latencies and quality checks since the step began); the baseline's latencies are kept
across steps, since the baseline does not change. A gate is judged only once it has
its minimum of data, so a step can neither pass nor fail on three requests.

The state (step, status, when the step began, recent decisions) is saved after every
decision in a `store` (Ray's GCS key-value store in the router), keyed by the app, and
stamped with a fingerprint of the policy and the variants' models: a router that
restarts resumes the same rollout, while a `serve deploy` that changes the policy or
the models starts a new one (a manual deploy always wins).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field

from serve.decisions.router_config import CanaryPolicy

FAILED_OUTCOMES = ("error", "unavailable", "timeout")  # the candidate's fault; refusals and cancels are not
RUNNING, ROLLED_BACK, COMPLETE = "running", "rolled_back", "complete"
PROMOTE, ROLLBACK, DONE = "promote", "rollback", "complete"
BASELINE_LATENCIES = 2000  # the baseline's most recent latencies kept for the p99 comparison


def p99(values) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None


@dataclass
class StepWindow:
    """What the candidate did since its step began."""

    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    agreements: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.ok + self.failed


@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    limit: float
    passed: bool | None  # None: not enough data yet, or the value too close to the limit to tell
    stderr: float | None = None  # of `value`, when it is a mean of samples


def mean_and_stderr(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread / len(values) ** 0.5


def verdict(value: float, stderr: float | None, limit: float, upper_limit: bool, z: float) -> bool | None:
    """Pass when the value clears the limit by z standard errors, fail when it misses it by as
    much, else None (keep measuring). A value without a standard error is taken as it is."""
    margin = z * (stderr or 0.0)
    worst, best = (value + margin, value - margin) if upper_limit else (value - margin, value + margin)
    if (worst <= limit) if upper_limit else (worst >= limit):
        return True
    if (best > limit) if upper_limit else (best < limit):
        return False
    return None


@dataclass(frozen=True)
class Decision:
    decision: str  # promote, rollback or complete
    reason: str  # the failed gate, or gates_held
    weight_before: float
    weight_after: float
    gates: tuple[Gate, ...]
    at: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        numbers = ", ".join(f"{g.name}={g.value:.4g}{'' if g.stderr is None else f' ± {g.stderr:.2g}'} "
                            f"(limit {g.limit:g})" for g in self.gates if g.value is not None)
        return (f"canary {self.decision} ({self.reason}): {self.weight_before:.0%} -> {self.weight_after:.0%}; "
                f"{numbers or 'no gate measured'}")


def judge(policy: CanaryPolicy, window: StepWindow, baseline_p99: float | None,
          cost_ratio: float | None) -> list[Gate]:
    """Every gate that is on, with its live value, the value's standard error when it is a
    mean, and its verdict once the gate has its minimum of data."""
    gates = policy.gates
    enough = window.requests >= policy.min_requests
    pairs = len(window.gaps) >= policy.min_pairs
    rate = window.failed / window.requests if window.requests else None
    rate_stderr = (rate * (1 - rate) / window.requests) ** 0.5 if window.requests else None
    candidate_p99 = p99(window.latencies)
    ratio = candidate_p99 / baseline_p99 if candidate_p99 is not None and baseline_p99 else None
    measured = [  # name, limit, value, its standard error, enough data, the limit is an upper one
        ("error_rate", gates.max_error_rate, rate, rate_stderr, enough, True),
        ("p99_latency", gates.max_p99_latency_ratio, ratio, None, len(window.latencies) >= policy.min_requests, True),
        ("quality_gap", gates.max_quality_gap, *mean_and_stderr(window.gaps), pairs, True),
        ("agreement", gates.min_agreement, *mean_and_stderr(window.agreements), pairs, False),
        ("cost", gates.max_cost_ratio, cost_ratio, None, enough, True),
    ]
    out = []
    for name, limit, value, stderr, has_data, upper in measured:
        if limit is None:
            continue
        passed = None if value is None or not has_data else verdict(value, stderr, limit, upper, gates.confidence_z)
        out.append(Gate(name, value, limit, passed, stderr))
    return out


@dataclass
class CanaryState:
    fingerprint: str
    step: int = 0
    status: str = RUNNING
    step_started: float = 0.0  # wall-clock seconds
    decisions: list[dict] = field(default_factory=list)  # the most recent, newest last

    def weight(self, policy: CanaryPolicy) -> float:
        return 0.0 if self.status == ROLLED_BACK else policy.steps[self.step]


def fingerprint(policy: CanaryPolicy, models: dict[str, str]) -> str:
    """What identifies a rollout: the policy and the candidate's and baseline's models."""
    spec = {"policy": policy.model_dump(), "models": {v: models.get(v) for v in (policy.variant, policy.baseline)}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class CanaryController:
    """Decides (when `leader`) or follows the saved state (other router replicas)."""

    def __init__(self, policy: CanaryPolicy, models: dict[str, str], store, key: str, leader: bool, now: float):
        self.policy, self.store, self.key, self.leader = policy, store, key, leader
        stamp = fingerprint(policy, models)
        saved = store.load(key)
        if saved and saved.get("fingerprint") == stamp:
            self.state, self.resumed = CanaryState(**saved), True
        else:
            self.state, self.resumed = CanaryState(stamp, step_started=now), False
            if leader:
                store.save(key, asdict(self.state))
        self.window = StepWindow()
        self.baseline_latencies: deque[float] = deque(maxlen=BASELINE_LATENCIES)
        self.cost_ratio: float | None = None  # the last one the router measured

    @property
    def weight(self) -> float:
        return self.state.weight(self.policy)

    def weights(self) -> dict[str, float]:
        return {self.policy.baseline: 1.0 - self.weight, self.policy.variant: self.weight}

    def status(self) -> dict:
        """The state, the current step's evidence gate by gate, and recent decisions."""
        gates = judge(self.policy, self.window, p99(self.baseline_latencies), self.cost_ratio)
        evidence = {"requests": self.window.requests, "failed": self.window.failed, "pairs": len(self.window.gaps),
                    "gates": [asdict(g) for g in gates]}
        return {"variant": self.policy.variant, "baseline": self.policy.baseline, "status": self.state.status,
                "weight": self.weight, "steps": self.policy.steps, "step": self.state.step,
                "step_started": self.state.step_started, "evidence": evidence, "decisions": self.state.decisions}

    def record_outcome(self, variant: str, status: str, latency_s: float | None) -> None:
        if variant == self.policy.baseline and status == "ok" and latency_s is not None:
            self.baseline_latencies.append(latency_s)
        elif variant == self.policy.variant and self.state.status == RUNNING:
            if status == "ok":
                self.window.ok += 1
                if latency_s is not None:
                    self.window.latencies.append(latency_s)
            elif status in FAILED_OUTCOMES:
                self.window.failed += 1

    def record_pair(self, variant: str, gap: float | None, agreement: float) -> None:
        if variant == self.policy.variant and self.state.status == RUNNING:
            self.window.agreements.append(agreement)
            if gap is not None:
                self.window.gaps.append(gap)

    def tick(self, now: float, cost_ratio: float | None) -> Decision | None:
        """Leader: judge the step and act. Follower: pick up the leader's saved state."""
        if not self.leader:
            saved = self.store.load(self.key)
            if saved and saved.get("fingerprint") == self.state.fingerprint:
                self.state = CanaryState(**saved)
            return None
        self.cost_ratio = cost_ratio
        if self.state.status != RUNNING:
            return None
        gates = judge(self.policy, self.window, p99(self.baseline_latencies), cost_ratio)
        failed = [g for g in gates if g.passed is False]
        before = self.weight
        if failed:
            self.state.status, reason, kind = ROLLED_BACK, failed[0].name, ROLLBACK
        elif all(g.passed for g in gates) and self.window.requests >= self.policy.min_requests \
                and now - self.state.step_started >= self.policy.min_seconds:
            reason = "gates_held"
            if self.state.step + 1 < len(self.policy.steps):
                self.state.step, kind = self.state.step + 1, PROMOTE
            else:
                self.state.status, kind = COMPLETE, DONE
        else:
            return None
        decision = Decision(kind, reason, before, self.weight, tuple(gates), now)
        self.state.step_started = now
        self.state.decisions = (self.state.decisions + [decision.to_dict()])[-20:]
        self.window = StepWindow()
        self.store.save(self.key, asdict(self.state))
        return decision
