"""The flags of vLLM's `vllm bench serve` that `python -m loadtest` takes as they are, so a
command line written for one runs against the other and both write the same fields."""
from __future__ import annotations

import argparse
import math

from loadtest.summary import GOODPUT_METRICS, METRICS, SummarySpec
from sinkprune.cli_args import integer, number

VLLM_DEFAULT_METRICS = "ttft,tpot,itl"  # vLLM's default for a generative model
VLLM_DEFAULT_PERCENTILES = "99"


def add_vllm_flags(parser: argparse.ArgumentParser, mode: argparse._MutuallyExclusiveGroup) -> None:
    """`--request-rate` joins the group that picks the load mode (`mode`); the rest stand beside it."""
    mode.add_argument("--request-rate", type=number(0, math.inf, lo_open=True, allow_inf=True), default=None,
                      help="vLLM's flag: one open-loop point at this rate per second (inf: all at once)")
    parser.add_argument("--max-concurrency", type=integer(1, 1_000_000), default=None,
                        help="vLLM's flag: at most this many requests in flight; caps --request-rate / --rates, "
                             "or alone runs a closed loop at this concurrency")
    parser.add_argument("--percentile-metrics", default=None,
                        help=f"vLLM's flag: comma-separated among {','.join(METRICS)} (default with "
                             f"--metric-percentiles: {VLLM_DEFAULT_METRICS}; with neither: all four)")
    parser.add_argument("--metric-percentiles", default=None,
                        help=f"vLLM's flag: comma-separated percentiles (default with --percentile-metrics: "
                             f"{VLLM_DEFAULT_PERCENTILES}; with neither: 50,90,95,99)")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help=f"vLLM's flag: SLOs in ms, keys among {','.join(GOODPUT_METRICS)}; "
                             "request_goodput counts the requests meeting all of them, per second")


def validate_load_flags(args) -> None:
    """The mode flags' values, each error naming its flag."""
    if args.request_rate is not None and not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf sends every request at once), not {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, not {args.max_concurrency}")
    if args.max_concurrency is not None and args.concurrencies:
        raise ValueError("--max-concurrency caps --request-rate or --rates, or stands alone; "
                         "it cannot be given with --concurrencies")
    if math.isnan(args.burstiness) or args.burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, not {args.burstiness}")


def summary_spec(args) -> SummarySpec:
    """What the summaries hold; either percentile flag switches to vLLM's defaults for the other."""
    spec = SummarySpec(goodput_ms=parse_goodput(args.goodput))
    if args.percentile_metrics is None and args.metric_percentiles is None:
        return spec
    metrics = (args.percentile_metrics or VLLM_DEFAULT_METRICS).split(",")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown metric {unknown[0]!r}; choose among {', '.join(METRICS)}")
    spec.metrics = tuple(dict.fromkeys(metrics))
    try:
        percentiles = [float(p) for p in (args.metric_percentiles or VLLM_DEFAULT_PERCENTILES).split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r} is not a comma-separated list of "
                         "numbers") from None
    if not all(0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: each must be within 0..100")
    spec.percentiles = tuple(percentiles)
    return spec


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "e2el:2000"]` -> `{"ttft": 500.0, "e2el": 2000.0}` (milliseconds)."""
    slo: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = None
        if not sep or ms is None:
            raise ValueError(f"--goodput {pair!r} is not KEY:VALUE with the value in milliseconds, e.g. ttft:500")
        if name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {pair!r}: unknown metric {name!r}; choose among {', '.join(GOODPUT_METRICS)}")
        if not ms >= 0:
            raise ValueError(f"--goodput {pair!r}: the value must be >= 0 milliseconds")
        slo[name] = ms
    return slo
