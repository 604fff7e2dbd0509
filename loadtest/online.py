"""What the router measured while the load ran: online quality (the dense model scoring a
sample of the other variants' answers), the canary's decisions and weight, and the live
cost, from two Prometheus text expositions of the app (before and after the load).

Counters and histograms count what happened between the two scrapes; gauges are read
from the second. Ray adds labels (application, deployment, replica, WorkerId, ...) that
split one series into several: counters are summed over them, gauges averaged (two
router replicas that both say weight 0.25 mean 0.25, not 0.5).

The mean quality gap and agreement come from the router's exact sums (counters) over the
histograms' _count: Ray builds a histogram's _sum from bucket midpoints, with positive bounds
only, so _sum / _count counts every negative gap as +0.005. A server older than those counters
(neither in either scrape) gets _sum / _count, marked approximate.
"""
from __future__ import annotations

import statistics

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "ray_sinkserve_"
PAIRS = PREFIX + "quality_pairs_total"
NLL_GAP = PREFIX + "quality_nll_gap_nats"
AGREEMENT = PREFIX + "quality_token_agreement"
# Exact sums beside the histograms: |gap| by the gap's sign ("positive", "negative"), and the agreements.
# A series exists once something was added to it (a zero gap or agreement adds nothing).
NLL_GAP_EXACT = PREFIX + "quality_nll_gap_exact_sum_nats_total"
AGREEMENT_EXACT = PREFIX + "quality_token_agreement_exact_sum_total"
SIGNS = {"positive": 1.0, "negative": -1.0}
DECISIONS = PREFIX + "canary_decisions_total"
WEIGHT = PREFIX + "canary_weight"
COST = PREFIX + "cost_per_million_output_tokens"

Series = dict[tuple[str, frozenset], float]

QUALITY_TEXT = (("nll_gap_nats", "NLL gap vs dense {} nats/token", "+.3f"),
                ("token_agreement", "token agreement {}", ".3f"))


def parse_exposition(text: str) -> Series:
    """`{(sample name, labels): value}` for every sample of the exposition."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _key(labels: frozenset, by: tuple[str, ...]) -> tuple[str, ...]:
    found = dict(labels)
    return tuple(found.get(label, "?") for label in by)


def increase(before: Series, after: Series, name: str, by: tuple[str, ...]) -> dict[tuple, float] | None:
    """Growth of the samples called `name` per `by` label values (None: no such sample after).
    Taken series by series, as Prometheus' increase(): one that went down was restarted with
    its process and counts from zero; one gone by the second scrape adds nothing."""
    grown: dict[tuple, float] = {}
    found = False
    for (sample, labels), value in after.items():
        if sample == name:
            found = True
            old = before.get((sample, labels), 0.0)
            key = _key(labels, by)
            grown[key] = grown.get(key, 0.0) + (value - old if value >= old else value)
    return grown if found else None


def gauge(after: Series, name: str, by: tuple[str, ...]) -> dict[tuple, float] | None:
    """The mean over series of a gauge per `by` label values (None: no such sample)."""
    values: dict[tuple, list[float]] = {}
    for (sample, labels), value in after.items():
        if sample == name:
            values.setdefault(_key(labels, by), []).append(value)
    return {key: statistics.fmean(v) for key, v in values.items()} or None


def _exported(before: Series, after: Series, names: tuple[str, ...]) -> bool:
    return any(sample in names for series in (before, after) for sample, _ in series)


def _exact_sums(before: Series, after: Series) -> tuple[dict, dict]:
    """The growth of the exact sums per variant: the NLL gap's (positive minus negative) and the agreement's."""
    gap: dict[tuple, float] = {}
    for (variant, sign), grown in (increase(before, after, NLL_GAP_EXACT, ("variant", "sign")) or {}).items():
        gap[(variant,)] = gap.get((variant,), 0.0) + SIGNS.get(sign, 0.0) * grown
    return gap, increase(before, after, AGREEMENT_EXACT, ("variant",)) or {}


def _histogram_means(before: Series, after: Series, name: str, exact: dict | None) -> dict[str, dict] | None:
    """`{variant: {"mean", "count", "exact"}}`: the mean of the observations made between the scrapes,
    `exact` sums over the histogram's _count (a variant missing from them added nothing), or without
    them (None) the histogram's own _sum, which Ray builds from bucket midpoints."""
    counts = increase(before, after, name + "_count", ("variant",))
    sums = exact if exact is not None else increase(before, after, name + "_sum", ("variant",))
    if sums is None or counts is None:
        return None
    return {variant: {"mean": sums.get((variant,), 0.0) / n if n > 0 else None, "count": n,
                      "exact": exact is not None} for (variant,), n in counts.items()}


def online_quality(before: Series, after: Series) -> dict | None:
    """Per candidate variant: pairs by outcome, the NLL gap (nats/token) and the token agreement.
    A server that exports either exact sum exports both, so one absent from both scrapes while the
    other is there added nothing (every gap 0, or every agreement 0); both absent: an older server."""
    pairs = increase(before, after, PAIRS, ("variant", "outcome")) or {}
    exact_gap, exact_agreement = _exact_sums(before, after)
    if not _exported(before, after, (NLL_GAP_EXACT, AGREEMENT_EXACT)):
        exact_gap = exact_agreement = None
    gap = _histogram_means(before, after, NLL_GAP, exact_gap) or {}
    agreement = _histogram_means(before, after, AGREEMENT, exact_agreement) or {}
    variants = sorted({v for v, _ in pairs} | set(gap) | set(agreement))
    if not variants:
        return None
    return {v: {"pairs": {outcome: n for (variant, outcome), n in sorted(pairs.items()) if variant == v},
                "nll_gap_nats": gap.get(v), "token_agreement": agreement.get(v)} for v in variants}


def canary(before: Series, after: Series) -> dict | None:
    """Decisions taken between the scrapes (with their reason) and the weight after."""
    decisions = increase(before, after, DECISIONS, ("variant", "decision", "reason"))
    weight = gauge(after, WEIGHT, ("variant",))
    if decisions is None and weight is None:
        return None
    return {"decisions": [{"variant": v, "decision": d, "reason": r, "count": n}
                          for (v, d, r), n in sorted((decisions or {}).items()) if n > 0],
            "weight": {v: w for (v,), w in sorted(weight.items())} if weight else None}


def live_cost(after: Series) -> dict[str, float] | None:
    """The server's cost per million output tokens per variant, as of the second scrape."""
    cost = gauge(after, COST, ("variant",))
    return {v: c for (v,), c in sorted(cost.items())} if cost else None


def online_sections(before_text: str, after_text: str) -> dict:
    """The report's `online_quality`, `canary` and `live_cost` (each None when not exported)."""
    before, after = parse_exposition(before_text), parse_exposition(after_text)
    return {"online_quality": online_quality(before, after), "canary": canary(before, after),
            "live_cost": live_cost(after)}


def markdown_lines(report: dict) -> list[str]:
    """One line per variant's online quality, the canary's decisions and weight, the live cost."""
    lines = []
    for variant, q in (report.get("online_quality") or {}).items():
        pairs = q["pairs"]
        parts = [f"{pairs.get('scored', 0):.0f} pairs scored ({pairs.get('dropped_busy', 0):.0f} dropped busy, "
                 f"{pairs.get('failed', 0):.0f} failed)"]
        for key, template, fmt in QUALITY_TEXT:
            if q[key] is not None:
                mean = "n/a" if q[key]["mean"] is None else format(q[key]["mean"], fmt)
                approximate = "" if q[key].get("exact") else ", approximate (bucket midpoints)"
                parts.append(f"{template.format(mean)} over {q[key]['count']:.0f}{approximate}")
        lines.append(f"- Online quality of {variant} (during the run): {'; '.join(parts)}")
    if report.get("canary") is not None:
        decisions = ", ".join(f"{d['variant']} {d['decision']} ({d['reason']}) x{d['count']:.0f}"
                              for d in report["canary"]["decisions"]) or "none"
        lines.append(f"- Canary decisions during the run: {decisions}")
        if report["canary"]["weight"]:
            weights = ", ".join(f"{v} {w:.2f}" for v, w in report["canary"]["weight"].items())
            lines.append(f"- Canary weight after the run: {weights}")
    if report.get("live_cost"):
        costs = ", ".join(f"{v} {c:.3f}" for v, c in report["live_cost"].items())
        lines.append(f"- Live cost per 1M output tokens (server gauge, after the run): {costs}")
    return lines
