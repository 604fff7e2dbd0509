"""Summaries of a run with the field names and definitions of vLLM's serving benchmark
(`vllm bench serve`), per variant, so its numbers and ours can be compared."""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from loadtest.client import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")  # what vLLM's --percentile-metrics may name (for a generative model)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class SummarySpec:
    """Which latency distributions are written, at which percentiles, and the goodput SLOs (ms)."""

    metrics: tuple[str, ...] = METRICS
    percentiles: tuple[float, ...] = (50, 90, 95, 99)
    goodput_ms: dict[str, float] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percentile_key(name: str, q: float) -> str:
    """vLLM's key: `p99_ttft_ms`, `p99.9_ttft_ms`."""
    return f"p{int(q) if int(q) == q else q}_{name}_ms"


def _distribution(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict:
    values = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": statistics.fmean(values) if values else float("nan"),
           f"median_{name}_ms": statistics.median(values) if values else float("nan"),
           f"std_{name}_ms": statistics.pstdev(values) if values else float("nan")}
    out.update({percentile_key(name, q): _percentile(values, q) for q in percentiles})
    return out


def _tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first; 0 for a one-token answer (as vLLM's goodput takes it)."""
    if record.output_tokens <= 1:
        return 0.0
    return None if record.ttft_s is None else (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


def _latencies(ok: list[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per metric over successful requests. ITL: every gap between successive text chunks."""
    return {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
            "tpot": [_tpot_s(r) for r in ok if r.output_tokens > 1 and r.ttft_s is not None],
            "itl": [b - a for r in ok for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])],
            "e2el": [r.e2e_s for r in ok]}


def good_requests(ok: list[RequestRecord], slo_ms: dict[str, float]) -> int:
    """Requests meeting every SLO (vLLM: metric <= SLO); one with no first chunk misses a ttft SLO."""
    def meets(record: RequestRecord) -> bool:
        values = {"ttft": record.ttft_s, "tpot": _tpot_s(record), "e2el": record.e2e_s}
        return all(values[k] is not None and values[k] <= ms / 1000 for k, ms in slo_ms.items())

    return sum(1 for r in ok if meets(r))


def max_concurrent_requests(ok: list[RequestRecord]) -> int:
    """Peak number of successful requests in flight, over half-open [sent, done) intervals
    (vLLM's sweep: a request ending when another starts does not overlap it)."""
    events = sorted([(r.sent_at, 1) for r in ok] + [(r.sent_at + r.e2e_s, -1) for r in ok])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def max_output_tokens_per_s(ok: list[RequestRecord]) -> float:
    """Most output tokens arriving within one second (buckets from the first send, as vLLM).
    A chunk is a block of tokens: each request's tokens are spread evenly over its chunks."""
    if not ok:
        return 0.0
    first = min(r.sent_at for r in ok)
    buckets: Counter = Counter()
    for r in ok:
        for t in r.chunk_times_s:
            buckets[int(r.sent_at + t - first)] += r.output_tokens / len(r.chunk_times_s)
    return max(buckets.values(), default=0.0)


def summarize(records: list[RequestRecord], duration_s: float, spec: SummarySpec | None = None) -> dict:
    """One summary over `records` (all of them: failures are counted, never dropped)."""
    spec = spec or SummarySpec()
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)

    def per_s(n: float) -> float:
        return n / duration_s if duration_s > 0 else 0.0

    summary = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error_kind for r in records if not r.ok)),
        "duration": duration_s,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": per_s(len(ok)),
        "request_goodput": per_s(good_requests(ok, spec.goodput_ms)) if spec.goodput_ms else None,
        "output_throughput": per_s(output),
        "total_token_throughput": per_s(output + prompt),
        "max_output_tokens_per_s": max_output_tokens_per_s(ok),
        "max_concurrent_requests": max_concurrent_requests(ok),
    }
    latencies = _latencies(ok)
    for name in spec.metrics:
        summary.update(_distribution(name, latencies[name], spec.percentiles))
    return summary


def summarize_by_variant(records: list[RequestRecord], duration_s: float, spec: SummarySpec | None = None) -> dict:
    """`all` plus one summary per serving variant (requests with no answer go under `unknown`)."""
    variants = sorted({r.variant or "unknown" for r in records})
    out = {"all": summarize(records, duration_s, spec)}
    for variant in variants:
        out[variant] = summarize([r for r in records if (r.variant or "unknown") == variant], duration_s, spec)
    return out
