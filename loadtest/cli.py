"""`python -m loadtest`: drive real HTTP load at a sinkserve endpoint and summarise it.

Writes one JSON line per request (`records.jsonl`, failures included) and a
`summary.json` per sweep point, per variant, with vLLM's field names; vLLM's
`vllm bench serve` flags work beside ours (loadtest/vllm_flags.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from loadtest.client import RequestRecord, Target, send_completion
from loadtest.prompts import load_prompts
from loadtest.runner import Phase, run_phase
from loadtest.summary import SummarySpec, summarize_by_variant
from loadtest.vllm_flags import add_vllm_flags, summary_spec, validate_load_flags
from sinkprune.cli_args import SEED, Parser, add_version_flag, error_line, existing_file, integer, number, output_dir
from sinkprune.safe_output import add_overwrite_flag, check_output, staged_output

PROG = "python -m loadtest"

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WRITES = ("records.jsonl", "summary.json")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    add_version_flag(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="sinkserve", help="the `model` field of each request")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rates", default=None, help="open loop: comma-separated request rates per second (inf allowed)")
    mode.add_argument("--concurrencies", default=None, help="closed loop: comma-separated concurrencies (default 4)")
    add_vllm_flags(p, mode)
    p.add_argument("--burstiness", type=number(0, 1000, lo_open=True), default=1.0,
                   help="gamma shape of inter-arrivals (1 = Poisson)")
    p.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=integer(1, 10_000_000), default=32,
                   help="per sweep point (--num-prompts: vLLM's name)")
    p.add_argument("--max-seconds", type=number(0, 1e7, lo_open=True), default=120.0,
                   help="per sweep point; unsent requests are dropped")
    p.add_argument("--max-tokens", "--output-len", dest="max_tokens", type=integer(1, 1_048_576), default=32,
                   help="per request (--output-len: vLLM's name)")
    p.add_argument("--prompt-words", type=integer(1, 10_000), default=24,
                   help="words per prompt cut from the evaluation text")
    p.add_argument("--prompts", default=None, type=existing_file, help="a text file, one prompt per line (default: evaluation text)")
    p.add_argument("--variant", default=None, help="force a variant (x-dlm-variant header); default: the A/B router")
    p.add_argument("--users", type=integer(1, 10_000_000), default=64,
                   help="distinct user ids cycled through (sticky assignment)")
    p.add_argument("--chat", action="store_true",
                   help="load /v1/chat/completions (each prompt as one user message) instead of /v1/completions")
    p.add_argument("--extra", "--extra-body", dest="extra", default=None,
                   help="JSON merged into every request body, e.g. '{\"steps\": 16}' (--extra-body: vLLM's name)")
    p.add_argument("--timeout", type=number(0, 1e6, lo_open=True), default=120.0, help="per request, seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out-dir", default="runs/loadtest", type=output_dir,
                   help="must be new or empty (or --overwrite, over a previous load test's)")
    add_overwrite_flag(p)
    p.add_argument("--allow-remote", action="store_true", help="allow a base URL that is not loopback")
    p.add_argument("--quiet", action="store_true")
    return p


def phases(args) -> list[Phase]:
    """One phase per sweep point; `--max-concurrency` caps open-loop points or alone is the closed loop."""
    cap = args.max_concurrency
    if args.request_rate is not None or args.rates:
        rates = [args.request_rate] if args.request_rate is not None else [float(r) for r in args.rates.split(",")]
        return [Phase(args.num_requests, args.max_seconds, rate=r, concurrency=cap, burstiness=args.burstiness,
                      seed=args.seed) for r in rates]
    concurrencies = [cap] if cap else [int(c) for c in (args.concurrencies or "4").split(",")]
    return [Phase(args.num_requests, args.max_seconds, concurrency=c) for c in concurrencies]


def validate(args) -> None:
    host = urlparse(args.base_url).hostname
    if urlparse(args.base_url).scheme not in ("http", "https") or not host:
        raise ValueError(f"--base-url {args.base_url!r} is not an http(s) URL")
    if host not in LOOPBACK and not args.allow_remote:
        raise ValueError(f"--base-url host {host!r} is not loopback; pass --allow-remote to load a remote endpoint")
    for name in ("rates", "concurrencies", "variant", "model"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise ValueError(f"--{name} {value!r} is empty")
    validate_load_flags(args)
    flag = "--rates" if args.rates else "--concurrencies"
    try:
        points = phases(args)
    except ValueError:
        raise ValueError(f"{flag} {args.rates or args.concurrencies!r} is not a comma-separated list of "
                         f"{'numbers' if args.rates else 'integers'}") from None
    if not points or len(points) > 1000:
        raise ValueError(f"{flag} {args.rates or args.concurrencies!r}: give 1 to 1000 sweep points")
    for phase in points:
        if (phase.rate is not None and not phase.rate > 0) or \
                (phase.concurrency is not None and not 1 <= phase.concurrency <= 1_000_000):
            raise ValueError(f"{flag} {args.rates or args.concurrencies!r}: rates must be > 0 (inf allowed) and "
                             "concurrencies within 1..1000000")


def parse_extra(spec: str | None) -> dict | None:
    if not spec:
        return None
    try:
        extra = json.loads(spec)
    except json.JSONDecodeError as err:
        raise ValueError(f"--extra is not valid JSON: {err}") from err
    if not isinstance(extra, dict):
        raise ValueError("--extra must be a JSON object, e.g. '{\"steps\": 16}'")
    return extra


async def run(args, out: Path, prompts: list[str], extra: dict | None, spec: SummarySpec) -> dict:
    """Run every phase; records.jsonl and summary.json go to `out`."""
    target = Target(args.base_url, args.model, args.api_key, args.timeout, chat=args.chat)
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        with open(out / "records.jsonl", "w") as log:
            for phase in phases(args):
                def make_record(i: int) -> RequestRecord:
                    return RequestRecord(index=i, user=f"user-{i % args.users}", variant_requested=args.variant)

                async def send(record: RequestRecord, start: float) -> RequestRecord:
                    return await send_completion(session, target, record, prompts[record.index % len(prompts)],
                                                 args.max_tokens, extra, start)

                records, duration = await run_phase(phase, make_record, send, progress=not args.quiet)
                for record in records:
                    log.write(json.dumps({"phase": phase.label, **record.to_dict()}) + "\n")
                rate = phase.rate if phase.rate is not None else float("inf")
                results.append({"phase": phase.label, "rate": phase.rate, "concurrency": phase.concurrency,
                                "request_rate": rate if rate < float("inf") else "inf", "burstiness": phase.burstiness,
                                "max_concurrency": phase.concurrency,
                                "summary": summarize_by_variant(records, duration, spec)})
    report = {"base_url": args.base_url, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
              "variant": args.variant, "num_prompts": args.num_requests,
              "percentile_metrics": ",".join(spec.metrics), "goodput": spec.goodput_ms or None, "phases": results}
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    """Throughput and the mean latencies (those written whatever --percentile-metrics chose)."""
    print(f"{'phase':>32} {'variant':>8} {'ok':>4} {'fail':>4} {'req/s':>7} {'tok/s':>8} {'peak':>4} "
          f"{'e2e ms':>8} {'ttft ms':>8} {'itl ms':>8}")
    for phase in report["phases"]:
        for variant, s in phase["summary"].items():
            means = " ".join(f"{s.get(f'mean_{m}_ms', float('nan')):>8.0f}" for m in ("e2el", "ttft", "itl"))
            print(f"{phase['phase']:>32} {variant:>8} {s['completed']:>4} {s['failed']:>4} "
                  f"{s['request_throughput']:>7.2f} {s['output_throughput']:>8.1f} {s['max_concurrent_requests']:>4} "
                  f"{means}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        spec = summary_spec(args)
        extra = parse_extra(args.extra)
        prompts = load_prompts(args.num_requests, args.prompt_words, args.prompts, args.seed)
        check_output(args.out_dir, args.overwrite, ours=WRITES)
    except (ValueError, OSError) as err:
        return error_line(PROG, str(err))
    with staged_output(args.out_dir, args.overwrite, ours=WRITES) as out:
        report = asyncio.run(run(args, out, prompts, extra, spec))
    if not args.quiet:
        print_table(report)
        print(f"wrote {Path(args.out_dir) / 'records.jsonl'} and {Path(args.out_dir) / 'summary.json'}")
    return 0
