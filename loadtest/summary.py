"""Summaries of a run with the field names of vLLM's serving benchmark, per variant."""
from __future__ import annotations

import statistics
from collections import Counter

from loadtest.client import RequestRecord

PERCENTILES = (50, 90, 95, 99)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _distribution(name: str, values_s: list[float]) -> dict:
    values = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": statistics.fmean(values) if values else float("nan"),
           f"median_{name}_ms": statistics.median(values) if values else float("nan"),
           f"std_{name}_ms": statistics.pstdev(values) if values else float("nan")}
    out.update({f"p{q}_{name}_ms": _percentile(values, q) for q in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """One summary over `records` (all of them: failures are counted, never dropped)."""
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
            if r.ttft_s is not None and r.output_tokens > 1]
    summary = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error_kind for r in records if not r.ok)),
        "duration": duration_s,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (output + prompt) / duration_s if duration_s > 0 else 0.0,
    }
    summary.update(_distribution("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    summary.update(_distribution("e2el", [r.e2e_s for r in ok]))
    summary.update(_distribution("tpot", tpot))
    return summary


def summarize_by_variant(records: list[RequestRecord], duration_s: float) -> dict:
    """`all` plus one summary per serving variant (requests with no answer go under `unknown`)."""
    variants = sorted({r.variant or "unknown" for r in records})
    out = {"all": summarize(records, duration_s)}
    for variant in variants:
        out[variant] = summarize([r for r in records if (r.variant or "unknown") == variant], duration_s)
    return out
