"""Prometheus metrics of the serving app, through Ray Serve's metrics API.

Ray exports them (with its `ray_` prefix) on each node's metrics port and
aggregates every replica, so the same names work on one machine and on a
cluster. One prefix (`sinkserve_`), base units (seconds, tokens), a `variant`
label on every series, no high-cardinality labels.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "sinkserve_"
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Ray accepts only positive bucket bounds and silently drops an observation at or below zero, so
# a gap or agreement is observed at least at half the first bound: it lands in the first bucket
# ("at most 0.01": the candidate's answer as likely as the reference's, or likelier) and _count
# stays the number of checks. Means come from the exact sums below, not from _sum.
GAP_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8]
AGREEMENT_BUCKETS = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]


class ReplicaMetrics:
    """What one variant's replica reports: requests, tokens, steps and the engine's batches."""

    def __init__(self, variant: str):
        self.tags = {"variant": variant}
        keys = ("variant",)
        self.latency = Histogram(PREFIX + "request_latency_seconds", "Request latency, arrival to last token",
                                 boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.ttfb = Histogram(PREFIX + "time_to_first_block_seconds", "Arrival to the first committed block",
                              boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.queue = Histogram(PREFIX + "queue_time_seconds", "Arrival to first scheduled step",
                               boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.generated = Counter(PREFIX + "generated_tokens", "Completion tokens returned", tag_keys=keys)
        self.prompt = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", tag_keys=keys)
        self.denoising_steps = Counter(PREFIX + "denoising_steps", "Denoising steps run, summed over requests",
                                       tag_keys=keys)
        self.forward_passes = Counter(PREFIX + "forward_passes", "Batched forward passes of the engine", tag_keys=keys)
        self.computed_positions = Counter(PREFIX + "computed_positions", "Positions the model computed, padding "
                                          "included (the prefix and dual caches lower it)", tag_keys=keys)
        self.step_latency = Histogram(PREFIX + "step_latency_seconds", "Latency of one batched denoising step",
                                      boundaries=STEP_BUCKETS, tag_keys=keys)
        self.batch_size = Histogram(PREFIX + "batch_size", "Sequences in one batched step",
                                    boundaries=BATCH_BUCKETS, tag_keys=keys)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for admission", tag_keys=keys)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests being denoised", tag_keys=keys)

    def request_finished(self, output) -> None:
        """Record a finished request's timings and tokens (the router counts outcomes)."""
        self.latency.observe(output.latency_s, tags=self.tags)
        if output.time_to_first_block_s is not None:
            self.ttfb.observe(output.time_to_first_block_s, tags=self.tags)
        if output.queue_s is not None:
            self.queue.observe(output.queue_s, tags=self.tags)
        for counter, value in ((self.generated, output.usage.completion_tokens),
                               (self.prompt, output.usage.prompt_tokens),
                               (self.denoising_steps, output.usage.forward_passes)):
            if value > 0:  # Ray counters refuse zero increments
                counter.inc(value, tags=self.tags)

    def step_finished(self, batch_size: int, seconds: float, waiting: int, running: int, positions: int) -> None:
        self.forward_passes.inc(1, tags=self.tags)
        self.computed_positions.inc(positions, tags=self.tags)
        self.step_latency.observe(seconds, tags=self.tags)
        self.batch_size.observe(batch_size, tags=self.tags)
        self.waiting.set(waiting, tags=self.tags)
        self.running.set(running, tags=self.tags)


OUTCOMES = ("ok", "invalid", "unauthorized", "overloaded", "cancelled", "error", "unavailable", "timeout")
NO_VARIANT = "none"  # refused before a variant was chosen (bad body, wrong key, unknown path)


class RouterMetrics:
    """Every request's outcome, A/B assignments, fallbacks and retries, counted by the router.

    Outcomes are counted here and not in the replicas: the router sees every request,
    including those its replica never answered (it died, timed out, or the client left),
    and its counts survive a replica being killed."""

    def __init__(self):
        self.requests = Counter(PREFIX + "requests", "Requests answered, by variant and status (" + ", ".join(OUTCOMES)
                                + "); variant 'none' when refused before a variant was chosen",
                                tag_keys=("variant", "status"))
        self.retries = Counter(PREFIX + "ab_retries", "Requests sent again to their variant after its replica died",
                               tag_keys=("variant",))
        self.variant_down = Counter(PREFIX + "ab_variant_down", "Times a variant was marked down (its health "
                                    "probe failed)", tag_keys=("variant",))
        self.assignments = Counter(PREFIX + "ab_assignments", "Requests assigned to a variant by the A/B router",
                                   tag_keys=("variant",))
        self.fallbacks = Counter(PREFIX + "ab_fallbacks", "Requests sent to another variant because theirs was down",
                                 tag_keys=("variant",))
        self.shadow = Counter(PREFIX + "ab_shadow_requests", "Quality-check copies of user requests run on a variant",
                              tag_keys=("variant",))
        self.quality_pairs = Counter(PREFIX + "quality_pairs", "Paired quality checks of a candidate variant, by "
                                     "outcome (scored, dropped_busy, failed)", tag_keys=("variant", "outcome"))
        self.quality_gap = Histogram(PREFIX + "quality_nll_gap_nats", "Reference model's NLL of the candidate's answer "
                                     "minus its NLL of its own answer (nats per token, paired)",
                                     boundaries=GAP_BUCKETS, tag_keys=("variant",))
        # Ray builds a histogram's _sum from bucket midpoints: these give the exact means
        self.quality_gap_exact = Counter(PREFIX + "quality_nll_gap_exact_sum_nats", "Sum of |quality gap| over scored "
                                         "pairs by the gap's sign; (positive - negative) / the gap histogram's "
                                         "_count is the exact mean", tag_keys=("variant", "sign"))
        self.quality_agreement_exact = Counter(PREFIX + "quality_token_agreement_exact_sum", "Sum of token "
                                               "agreements; over the agreement histogram's _count, the exact mean",
                                               tag_keys=("variant",))
        self.quality_agreement = Histogram(PREFIX + "quality_token_agreement", "Share of positions where the "
                                           "candidate's answer holds the reference's token",
                                           boundaries=AGREEMENT_BUCKETS, tag_keys=("variant",))
        self.cost = Gauge(PREFIX + "cost_per_million_output_tokens", "Replica-hour price / output tokens served over "
                          "the cost window, per million tokens (user traffic only)", tag_keys=("variant",))
        self.canary_decisions = Counter(PREFIX + "canary_decisions", "Canary decisions (promote, rollback, complete) "
                                        "and the gate that decided", tag_keys=("variant", "decision", "reason"))
        self.canary_weight = Gauge(PREFIX + "canary_weight", "Share of traffic the canary gives its candidate",
                                   tag_keys=("variant",))

    def quality_pair(self, variant: str, outcome: str, gap: float | None, agreement: float | None) -> None:
        """One quality check's outcome, and its gap and agreement when measured (exact sums beside
        the histograms; Ray refuses zero increments, and a zero adds nothing to a sum)."""
        tags = {"variant": variant}
        self.quality_pairs.inc(1, tags={**tags, "outcome": outcome})
        if agreement is not None:
            self.quality_agreement.observe(max(agreement, AGREEMENT_BUCKETS[0] / 2), tags=tags)
            if agreement > 0:
                self.quality_agreement_exact.inc(agreement, tags=tags)
        if gap is not None:
            self.quality_gap.observe(max(gap, GAP_BUCKETS[0] / 2), tags=tags)
            if gap != 0:
                self.quality_gap_exact.inc(abs(gap), tags={**tags, "sign": "positive" if gap > 0 else "negative"})

    def outcome(self, variant: str | None, status: str) -> None:
        assert status in OUTCOMES, status
        self.requests.inc(1, tags={"variant": variant or NO_VARIANT, "status": status})


def header_timeouts_counter():
    """Requests whose headers did not arrive in time, counted in Serve's HTTP proxy (a plain Ray
    worker, not a replica: `ray.util.metrics`); they never reached the router, whose
    `requests_total` counts everything else."""
    from ray.util.metrics import Counter as RayCounter

    return RayCounter(PREFIX + "header_timeouts", "Requests answered 408 and closed by Serve's HTTP proxy because "
                      "their headers did not arrive in time (they never reached the router)", tag_keys=("variant",))
