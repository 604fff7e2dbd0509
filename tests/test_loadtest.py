"""The load generator's accounting, against a small HTTP server on 127.0.0.1 that
speaks the completions SSE protocol and fails on purpose (the end-to-end tests
drive the real Ray Serve app)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading

import aiohttp
import pytest
from aiohttp import web

from loadtest.arrivals import arrival_offsets
from loadtest.cli import build_parser, phases, validate
from loadtest.cli import main as loadtest_main
from loadtest.client import RequestRecord, Target, send_completion
from loadtest.report import main as report_main
from loadtest.runner import Phase, run_phase
from loadtest.summary import summarize, summarize_by_variant
from loadtest.vllm_flags import summary_spec


def make_app(fail_every: int = 0, truncate_every: int = 0, slow_every: int = 0) -> web.Application:
    counter = {"n": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        counter["n"] += 1
        n = counter["n"]
        variant = request.headers.get("x-dlm-variant") or ("dense" if int(body["user"].split("-")[1]) % 2 else "pruned")
        if fail_every and n % fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-dlm-variant": variant})
        await response.prepare(request)
        if slow_every and n % slow_every == 0:
            await asyncio.sleep(2.0)
        for piece in ("hello", " world"):
            await response.write(f"data: {json.dumps({'choices': [{'text': piece, 'index': 0}]})}\n\n".encode())
            await asyncio.sleep(0.01)
        if truncate_every and n % truncate_every == 0:
            return response  # the stream stops without [DONE]
        usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 7 + body["max_tokens"]}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def _run_against(app: web.Application, phase: Phase, timeout: float = 5.0):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    target = Target(f"http://127.0.0.1:{port}", "sinkserve", timeout_s=timeout)
    try:
        async with aiohttp.ClientSession() as session:
            async def send(record, start):
                return await send_completion(session, target, record, "a prompt", 8, run_start=start)

            return await run_phase(phase, lambda i: RequestRecord(i, f"user-{i}", None), send, progress=False)
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _serving(app: web.Application):
    """The app on 127.0.0.1 in a thread of its own, for a CLI that runs its own event loop."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_arrivals_have_the_requested_rate_and_are_reproducible():
    offsets = arrival_offsets(4.0, 4000, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert abs(statistics.fmean(gaps) - 0.25) < 0.015
    assert abs(statistics.pstdev(gaps) - 0.25) < 0.02  # exponential: std = mean
    bursty = arrival_offsets(4.0, 4000, burstiness=0.25, seed=1)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.pstdev(bursty_gaps) > 1.5 * statistics.pstdev(gaps)
    assert arrival_offsets(4.0, 50, seed=3) == arrival_offsets(4.0, 50, seed=3)


def test_every_request_is_counted_and_failures_by_kind():
    records, duration = asyncio.run(_run_against(make_app(fail_every=5, truncate_every=7), Phase(20, 30, concurrency=4)))
    assert len(records) == 20
    summary = summarize_by_variant(records, duration)
    assert summary["all"]["completed"] + summary["all"]["failed"] == 20
    assert summary["all"]["errors"] == {"http_503": 4, "protocol": 2}
    assert summary["all"]["total_output_tokens"] == 8 * 14
    ok = [r for r in records if r.ok]
    assert all(r.text == "hello world" and r.ttft_s is not None and r.ttft_s <= r.e2e_s for r in ok)
    # two text chunks (the usage chunk carries none): one inter-chunk gap each (how long depends on
    # when the client's loop reads them, so no lower bound)
    assert all(len(r.chunk_times_s) == 2 and r.chunk_times_s[0] == r.ttft_s for r in ok)
    assert all(r.ttft_s <= r.chunk_times_s[1] <= r.e2e_s for r in ok)
    assert summary["dense"]["completed"] + summary["pruned"]["completed"] == 14
    assert summary["dense"]["completed"] == sum(1 for r in ok if r.variant == "dense")


def test_timeouts_are_failures_not_hangs():
    records, _ = asyncio.run(_run_against(make_app(slow_every=2), Phase(4, 30, concurrency=4), timeout=0.5))
    assert [r.error_kind for r in records].count("timeout") == 2


def test_open_loop_stops_at_its_time_limit():
    records, duration = asyncio.run(_run_against(make_app(), Phase(100, 1.0, rate=5.0)))
    assert 1 <= len(records) <= 12
    assert duration < 5.0


def test_cli_refuses_remote_targets_and_bad_numbers(capsys):
    assert loadtest_main(["--base-url", "http://10.1.2.3:8000"]) == 2
    assert "not loopback" in capsys.readouterr().err
    assert _exit_code(["--num-requests", "0"]) == 2  # refused while parsing (SystemExit), naming the range
    assert "argument --num-requests/--num-prompts: 0 is outside 1..10000000" in capsys.readouterr().err
    assert loadtest_main(["--extra", "{bad json"]) == 2


# ---- vLLM's flags and fields (`vllm bench serve`) ------------------------------------

def _exit_code(argv: list[str]) -> int:
    try:
        return loadtest_main(argv)
    except SystemExit as stop:  # argparse's own errors (the Parser makes them one line, code 2)
        return stop.code


def _phases(*argv: str) -> list[Phase]:
    args = build_parser().parse_args(list(argv))
    validate(args)
    return phases(args)


def test_vllm_flags_pick_the_same_load_as_ours():
    args = build_parser().parse_args(["--num-prompts", "8", "--output-len", "5", "--extra-body", '{"steps": 2}'])
    assert (args.num_requests, args.max_tokens, args.extra) == (8, 5, '{"steps": 2}')
    [point] = _phases("--request-rate", "inf", "--max-concurrency", "4")
    assert (point.rate, point.concurrency) == (float("inf"), 4)
    [point] = _phases("--request-rate", "2.5", "--burstiness", "0.5", "--seed", "3")
    assert (point.rate, point.concurrency, point.burstiness, point.seed) == (2.5, None, 0.5, 3)
    [point] = _phases("--max-concurrency", "3")  # alone: a closed loop, like --concurrencies 3
    assert (point.rate, point.concurrency) == (None, 3)
    assert [(p.rate, p.concurrency) for p in _phases("--rates", "1,2", "--max-concurrency", "2")] == [(1.0, 2), (2.0, 2)]
    assert [(p.rate, p.concurrency) for p in _phases("--concurrencies", "1,4")] == [(None, 1), (None, 4)]
    assert [(p.rate, p.concurrency) for p in _phases()] == [(None, 4)]


@pytest.mark.parametrize("argv, flag", [
    (["--request-rate", "0"], "--request-rate"),
    (["--request-rate", "fast"], "--request-rate"),
    (["--request-rate", "nan"], "--request-rate"),
    (["--request-rate", "2", "--rates", "1"], "--request-rate"),
    (["--request-rate", "2", "--burstiness", "0"], "--burstiness"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-concurrency", "2", "--concurrencies", "4"], "--max-concurrency"),
    (["--percentile-metrics", "ttft,latency"], "--percentile-metrics"),
    (["--metric-percentiles", "50,high"], "--metric-percentiles"),
    (["--metric-percentiles", "101"], "--metric-percentiles"),
    (["--goodput", "ttft500"], "--goodput"),
    (["--goodput", "itl:5"], "--goodput"),
    (["--goodput", "e2el:-1"], "--goodput"),
    (["--goodput", "ttft:500", "e2el:soon"], "--goodput"),
    (["--num-prompts", "0"], "--num-requests"),
])
def test_bad_vllm_flag_values_exit_2_naming_the_flag(argv, flag, capsys, tmp_path):
    assert _exit_code([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _record(index, sent_at, chunks, e2e, tokens, ok=True, variant="pruned"):
    return RequestRecord(index, f"user-{index}", None, variant=variant, ok=ok, sent_at=sent_at,
                         ttft_s=chunks[0] if chunks else None, e2e_s=e2e, chunk_times_s=list(chunks),
                         output_tokens=tokens, prompt_tokens=3, error_kind=None if ok else "http_503")


def test_itl_peak_concurrency_and_peak_tokens_from_known_chunk_times():
    records = [
        _record(0, 0.0, [0.1, 0.3, 0.6], 0.7, 6),  # in flight [0.0, 0.7)
        _record(1, 0.5, [0.2, 0.25], 0.4, 4),  # [0.5, 0.9)
        _record(2, 0.7, [0.5], 0.6, 2),  # [0.7, 1.3): starts as record 0 ends, no overlap
        _record(3, 0.0, [], 5.0, 0, ok=False),  # failed: not counted in flight (vLLM counts successes)
    ]
    s = summarize(records, 2.0)
    assert s["max_concurrent_requests"] == 2
    # gaps 200, 300 (record 0) and 50 ms (record 1); record 2 has a single chunk
    assert s["median_itl_ms"] == pytest.approx(200.0)
    assert s["mean_itl_ms"] == pytest.approx(550 / 3)
    assert s["std_itl_ms"] == pytest.approx(statistics.pstdev([200.0, 300.0, 50.0]))
    assert s["p99_itl_ms"] == pytest.approx(200 + 0.98 * 100)
    # second 0: 6 tokens of record 0 and 4 of record 1; second 1: record 2's 2
    assert s["max_output_tokens_per_s"] == pytest.approx(10.0)
    assert s["request_goodput"] is None  # no --goodput: null, as vLLM writes it
    for key in ("p50_ttft_ms", "p90_e2el_ms", "p95_tpot_ms", "p99_itl_ms"):  # our default: all four, 50/90/95/99
        assert key in s


def test_percentile_flags_choose_the_fields_as_vllm_does():
    records = [_record(0, 0.0, [0.1, 0.3], 0.4, 4), _record(1, 0.1, [0.2, 0.6], 0.7, 4)]
    spec = summary_spec(build_parser().parse_args(["--metric-percentiles", "50,99.9"]))
    assert spec.metrics == ("ttft", "tpot", "itl")  # vLLM's default for a generative model
    s = summarize(records, 1.0, spec)
    assert {"p50_itl_ms", "p99.9_itl_ms", "p50_tpot_ms", "mean_ttft_ms"} <= set(s)
    assert not any("e2el" in key for key in s) and "p99_itl_ms" not in s
    s = summarize(records, 1.0, summary_spec(build_parser().parse_args(["--percentile-metrics", "e2el"])))
    assert [k for k in s if k.startswith("p") and k.endswith("_ms")] == ["p99_e2el_ms"]
    assert "mean_ttft_ms" not in s


def test_request_goodput_counts_requests_meeting_every_slo():
    records = [
        _record(0, 0.0, [0.15], 0.60, 7),  # ttft at the SLO: good (vLLM: SLO >= metric); tpot 75 ms
        _record(1, 0.0, [0.20], 0.30, 3),  # ttft 200 > 150: not good
        _record(2, 0.0, [0.10], 0.90, 1),  # e2el 900 > 700: not good
        _record(3, 0.0, [0.05], 0.50, 1),  # one token: tpot counts as 0: good
        _record(4, 0.0, [0.05], 0.30, 9),  # tpot 31.25 ms: good
        _record(5, 0.0, [0.01], 0.10, 2, ok=False),  # failed requests are never good
    ]
    args = build_parser().parse_args(["--goodput", "ttft:150", "e2el:700"])
    assert summary_spec(args).goodput_ms == {"ttft": 150.0, "e2el": 700.0}
    s = summarize(records, 2.0, summary_spec(args))
    assert s["request_goodput"] == pytest.approx(3 / 2.0)
    assert s["request_throughput"] == pytest.approx(5 / 2.0)
    tight = summarize(records, 2.0, summary_spec(build_parser().parse_args(["--goodput", "tpot:50"])))
    assert tight["request_goodput"] == pytest.approx(4 / 2.0)  # only record 0 (75 ms) misses


def test_max_concurrency_caps_requests_in_flight_in_open_loop():
    capped, _ = asyncio.run(_run_against(make_app(), Phase(12, 30, rate=float("inf"), concurrency=3)))
    free, _ = asyncio.run(_run_against(make_app(), Phase(12, 30, rate=float("inf"))))
    assert len(capped) == 12 and summarize(capped, 1.0)["max_concurrent_requests"] == 3
    assert summarize(free, 1.0)["max_concurrent_requests"] > 3


def test_cli_with_only_vllm_flags_writes_vllm_fields(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    with _serving(make_app()) as base_url:
        code = loadtest_main(["--base-url", base_url, "--num-prompts", "8", "--request-rate", "inf",
                              "--max-concurrency", "4", "--percentile-metrics", "ttft,tpot,itl,e2el",
                              "--metric-percentiles", "50,99", "--goodput", "e2el:100000", "--output-len", "4",
                              "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    [point] = report["phases"]
    assert (point["request_rate"], point["max_concurrency"], report["num_prompts"]) == ("inf", 4, 8)
    s = point["summary"]["all"]
    assert s["completed"] == 8 and s["total_output_tokens"] == 32 and s["total_input_tokens"] == 56
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert 1 <= s["max_concurrent_requests"] <= 4
    for metric in ("ttft", "tpot", "itl", "e2el"):  # NaN (no values) fails these comparisons
        assert s[f"p99_{metric}_ms"] >= s[f"p50_{metric}_ms"] >= 0 and f"p90_{metric}_ms" not in s
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [len(r["chunk_times_s"]) for r in records] == [2] * 8


# ---- the report's online quality, canary decisions and live cost ---------------------

def _ray(text: str) -> str:
    """Ray's labels on every sample, R1 and R2 standing for two replicas of the router."""
    for replica in ("R1", "R2"):
        labels = (f'Component="core_worker",NodeAddress="10.0.0.5",SessionName="session_2026-11-30_14-02-11_123456_1",'
                  f'WorkerId="{replica.lower()}0f3e9a",application="sinkserve",deployment="Router",'
                  f'replica="sinkserve#Router#{replica.lower()}"')
        text = text.replace("{" + replica + ",", "{" + labels + ",")
    return text


BEFORE = _ray("""# HELP ray_sinkserve_requests_total Requests finished
# TYPE ray_sinkserve_requests_total counter
ray_sinkserve_requests_total{R1,status="ok",variant="pruned"} 10.0
# HELP ray_sinkserve_quality_pairs_total Answers paired with the dense model's
# TYPE ray_sinkserve_quality_pairs_total counter
ray_sinkserve_quality_pairs_total{R1,outcome="scored",variant="pruned"} 10.0
ray_sinkserve_quality_pairs_total{R2,outcome="scored",variant="pruned"} 4.0
ray_sinkserve_quality_pairs_total{R1,outcome="dropped_busy",variant="pruned"} 1.0
ray_sinkserve_quality_pairs_total{R2,outcome="scored",variant="pruned24"} 2.0
# HELP ray_sinkserve_quality_nll_gap_nats Dense NLL of the candidate's answer minus of its own
# TYPE ray_sinkserve_quality_nll_gap_nats histogram
ray_sinkserve_quality_nll_gap_nats_bucket{R1,le="0.5",variant="pruned"} 9.0
ray_sinkserve_quality_nll_gap_nats_bucket{R1,le="+Inf",variant="pruned"} 10.0
ray_sinkserve_quality_nll_gap_nats_sum{R1,variant="pruned"} 2.0
ray_sinkserve_quality_nll_gap_nats_count{R1,variant="pruned"} 10.0
ray_sinkserve_quality_nll_gap_nats_bucket{R2,le="0.5",variant="pruned"} 4.0
ray_sinkserve_quality_nll_gap_nats_bucket{R2,le="+Inf",variant="pruned"} 4.0
ray_sinkserve_quality_nll_gap_nats_sum{R2,variant="pruned"} 1.0
ray_sinkserve_quality_nll_gap_nats_count{R2,variant="pruned"} 4.0
# HELP ray_sinkserve_quality_token_agreement Share of tokens the two answers agree on
# TYPE ray_sinkserve_quality_token_agreement histogram
ray_sinkserve_quality_token_agreement_bucket{R1,le="+Inf",variant="pruned"} 10.0
ray_sinkserve_quality_token_agreement_sum{R1,variant="pruned"} 9.0
ray_sinkserve_quality_token_agreement_count{R1,variant="pruned"} 10.0
ray_sinkserve_quality_token_agreement_bucket{R2,le="+Inf",variant="pruned"} 4.0
ray_sinkserve_quality_token_agreement_sum{R2,variant="pruned"} 3.6
ray_sinkserve_quality_token_agreement_count{R2,variant="pruned"} 4.0
# HELP ray_sinkserve_quality_nll_gap_exact_sum_nats_total Sum of |quality gap| over scored pairs by the gap's sign
# TYPE ray_sinkserve_quality_nll_gap_exact_sum_nats_total counter
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R1,sign="positive",variant="pruned"} 2.5
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R1,sign="negative",variant="pruned"} 0.4
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R2,sign="positive",variant="pruned"} 1.2
# HELP ray_sinkserve_quality_token_agreement_exact_sum_total Sum of token agreements
# TYPE ray_sinkserve_quality_token_agreement_exact_sum_total counter
ray_sinkserve_quality_token_agreement_exact_sum_total{R1,variant="pruned"} 9.1
ray_sinkserve_quality_token_agreement_exact_sum_total{R2,variant="pruned"} 3.5
# HELP ray_sinkserve_canary_decisions_total Canary decisions
# TYPE ray_sinkserve_canary_decisions_total counter
ray_sinkserve_canary_decisions_total{R1,decision="promote",reason="gates_held",variant="pruned"} 1.0
ray_sinkserve_canary_decisions_total{R1,decision="complete",reason="gates_held",variant="pruned"} 0.0
# HELP ray_sinkserve_canary_weight The candidate's share of traffic
# TYPE ray_sinkserve_canary_weight gauge
ray_sinkserve_canary_weight{R1,variant="pruned"} 0.1
ray_sinkserve_canary_weight{R2,variant="pruned"} 0.1
""")

# between the scrapes: R1 scored 10 more, R2 6 more. Their gaps: R1 +0.8 positive and 1.0 negative, R2 +0.3
# positive and 0.5 negative (its first negative gap: a new series), so the exact mean is
# (0.8 - 1.0 + 0.3 - 0.5) / 16 = -0.025; Ray's histogram _sum (bucket midpoints, a negative gap as +0.005)
# grew +2.0 and +1.6: 0.225. Agreements: exact +8.8 and +4.8, 0.85; _sum +9.0 and +5.4, 0.9.
# R2 failed one (a new series), R1 dropped 2 when busy; one promotion on R1, one rollback on R2 (new series)
AFTER = _ray("""# HELP ray_sinkserve_requests_total Requests finished
# TYPE ray_sinkserve_requests_total counter
ray_sinkserve_requests_total{R1,status="ok",variant="pruned"} 13.0
# HELP ray_sinkserve_quality_pairs_total Answers paired with the dense model's
# TYPE ray_sinkserve_quality_pairs_total counter
ray_sinkserve_quality_pairs_total{R1,outcome="scored",variant="pruned"} 20.0
ray_sinkserve_quality_pairs_total{R2,outcome="scored",variant="pruned"} 10.0
ray_sinkserve_quality_pairs_total{R1,outcome="dropped_busy",variant="pruned"} 3.0
ray_sinkserve_quality_pairs_total{R2,outcome="failed",variant="pruned"} 1.0
ray_sinkserve_quality_pairs_total{R2,outcome="scored",variant="pruned24"} 5.0
# HELP ray_sinkserve_quality_nll_gap_nats Dense NLL of the candidate's answer minus of its own
# TYPE ray_sinkserve_quality_nll_gap_nats histogram
ray_sinkserve_quality_nll_gap_nats_bucket{R1,le="0.5",variant="pruned"} 18.0
ray_sinkserve_quality_nll_gap_nats_bucket{R1,le="+Inf",variant="pruned"} 20.0
ray_sinkserve_quality_nll_gap_nats_sum{R1,variant="pruned"} 4.0
ray_sinkserve_quality_nll_gap_nats_count{R1,variant="pruned"} 20.0
ray_sinkserve_quality_nll_gap_nats_bucket{R2,le="0.5",variant="pruned"} 9.0
ray_sinkserve_quality_nll_gap_nats_bucket{R2,le="+Inf",variant="pruned"} 10.0
ray_sinkserve_quality_nll_gap_nats_sum{R2,variant="pruned"} 2.6
ray_sinkserve_quality_nll_gap_nats_count{R2,variant="pruned"} 10.0
# HELP ray_sinkserve_quality_token_agreement Share of tokens the two answers agree on
# TYPE ray_sinkserve_quality_token_agreement histogram
ray_sinkserve_quality_token_agreement_bucket{R1,le="+Inf",variant="pruned"} 20.0
ray_sinkserve_quality_token_agreement_sum{R1,variant="pruned"} 18.0
ray_sinkserve_quality_token_agreement_count{R1,variant="pruned"} 20.0
ray_sinkserve_quality_token_agreement_bucket{R2,le="+Inf",variant="pruned"} 10.0
ray_sinkserve_quality_token_agreement_sum{R2,variant="pruned"} 9.0
ray_sinkserve_quality_token_agreement_count{R2,variant="pruned"} 10.0
# HELP ray_sinkserve_quality_nll_gap_exact_sum_nats_total Sum of |quality gap| over scored pairs by the gap's sign
# TYPE ray_sinkserve_quality_nll_gap_exact_sum_nats_total counter
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R1,sign="positive",variant="pruned"} 3.3
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R1,sign="negative",variant="pruned"} 1.4
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R2,sign="positive",variant="pruned"} 1.5
ray_sinkserve_quality_nll_gap_exact_sum_nats_total{R2,sign="negative",variant="pruned"} 0.5
# HELP ray_sinkserve_quality_token_agreement_exact_sum_total Sum of token agreements
# TYPE ray_sinkserve_quality_token_agreement_exact_sum_total counter
ray_sinkserve_quality_token_agreement_exact_sum_total{R1,variant="pruned"} 17.9
ray_sinkserve_quality_token_agreement_exact_sum_total{R2,variant="pruned"} 8.3
# HELP ray_sinkserve_canary_decisions_total Canary decisions
# TYPE ray_sinkserve_canary_decisions_total counter
ray_sinkserve_canary_decisions_total{R1,decision="promote",reason="gates_held",variant="pruned"} 2.0
ray_sinkserve_canary_decisions_total{R1,decision="complete",reason="gates_held",variant="pruned"} 0.0
ray_sinkserve_canary_decisions_total{R2,decision="rollback",reason="quality_gap",variant="pruned"} 1.0
# HELP ray_sinkserve_canary_weight The candidate's share of traffic
# TYPE ray_sinkserve_canary_weight gauge
ray_sinkserve_canary_weight{R1,variant="pruned"} 0.25
ray_sinkserve_canary_weight{R2,variant="pruned"} 0.25
# HELP ray_sinkserve_cost_per_million_output_tokens Cost per million output tokens
# TYPE ray_sinkserve_cost_per_million_output_tokens gauge
ray_sinkserve_cost_per_million_output_tokens{R1,variant="dense"} 12.0
ray_sinkserve_cost_per_million_output_tokens{R2,variant="dense"} 12.0
ray_sinkserve_cost_per_million_output_tokens{R1,variant="pruned"} 8.0
ray_sinkserve_cost_per_million_output_tokens{R2,variant="pruned"} 8.0
""")


def _report_inputs(tmp_path, before: str, after: str) -> list[str]:
    run = tmp_path / "pruned_run"
    run.mkdir()
    records = [_record(i, 0.1 * i, [0.1, 0.3], 0.4, 4) for i in range(3)]
    spec = summary_spec(build_parser().parse_args(["--metric-percentiles", "99"]))  # no e2el percentiles at all
    run.joinpath("summary.json").write_text(json.dumps({"phases": [
        {"phase": "concurrency=4", "concurrency": 4, "summary": summarize_by_variant(records, 2.0, spec)}]}))
    (tmp_path / "before.txt").write_text(before)
    (tmp_path / "after.txt").write_text(after)
    return ["--run", f"pruned={run}", "--metrics-before", str(tmp_path / "before.txt"),
            "--metrics-after", str(tmp_path / "after.txt"), "--out-dir", str(tmp_path / "report")]


def test_report_reads_online_quality_and_canary_decisions_between_scrapes(tmp_path):
    assert report_main(_report_inputs(tmp_path, BEFORE, AFTER)) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    quality = report["online_quality"]["pruned"]
    assert quality["pairs"] == {"dropped_busy": 2.0, "failed": 1.0, "scored": 16.0}  # +10 on r1, +6 on r2
    assert quality["nll_gap_nats"]["count"] == 16.0
    # the exact sums' growth over delta(_count), not delta(_sum) / delta(_count) = 0.225 and 0.9
    assert quality["nll_gap_nats"] == {"mean": pytest.approx((0.8 - 1.0 + 0.3 - 0.5) / 16), "count": 16.0,
                                       "exact": True}
    assert quality["token_agreement"] == {"mean": pytest.approx((8.8 + 4.8) / 16), "count": 16.0, "exact": True}
    assert quality["nll_gap_nats"]["mean"] != pytest.approx((2.0 + 1.6) / 16)
    assert report["online_quality"]["pruned24"] == {"pairs": {"scored": 3.0}, "nll_gap_nats": None,
                                                    "token_agreement": None}  # a second candidate, not scored yet
    assert report["canary"]["decisions"] == [
        {"variant": "pruned", "decision": "promote", "reason": "gates_held", "count": 1.0},
        {"variant": "pruned", "decision": "rollback", "reason": "quality_gap", "count": 1.0}]
    assert report["canary"]["weight"] == {"pruned": 0.25}  # both replicas say 0.25: not summed
    assert report["live_cost"] == {"dense": 12.0, "pruned": 8.0}
    assert report["counts_agree"] is True and report["server_counts"]["pruned"]["ok"] == 3.0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "16 pairs scored (2 dropped busy, 1 failed)" in table
    assert "Online quality of pruned24 (during the run): 3 pairs scored (0 dropped busy, 0 failed)\n" in table
    assert "NLL gap vs dense -0.025 nats/token over 16; token agreement 0.850 over 16\n" in table
    assert "approximate" not in table
    assert "pruned promote (gates_held) x1, pruned rollback (quality_gap) x1" in table
    assert "Canary weight after the run: pruned 0.25" in table and "dense 12.000, pruned 8.000" in table
    assert "| pruned | 4 |" in table and "- / - / -" in table  # the run wrote no e2el percentiles


def _without(text: str, word: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if word not in line)


def test_report_from_a_server_without_the_exact_sums_says_its_means_are_approximate(tmp_path):
    before, after = _without(BEFORE, "_exact_sum_"), _without(AFTER, "_exact_sum_")  # an older server
    assert report_main(_report_inputs(tmp_path, before, after)) == 0
    quality = json.loads((tmp_path / "report" / "report.json").read_text())["online_quality"]["pruned"]
    assert quality["nll_gap_nats"] == {"mean": pytest.approx((2.0 + 1.6) / 16), "count": 16.0, "exact": False}
    assert quality["token_agreement"] == {"mean": pytest.approx((9.0 + 5.4) / 16), "count": 16.0, "exact": False}
    table = (tmp_path / "report" / "report.md").read_text()
    assert ("NLL gap vs dense +0.225 nats/token over 16, approximate (bucket midpoints); "
            "token agreement 0.900 over 16, approximate (bucket midpoints)\n") in table


def test_report_counts_an_exact_sum_with_no_series_as_zero_when_the_server_exports_the_other(tmp_path):
    """A series appears at its first addition: a server with the exact sums whose gaps were all 0 has
    no gap series, only the agreement's. Its mean gap is 0, not the histogram's midpoints (+0.225)."""
    before, after = _without(BEFORE, "nll_gap_exact_sum_"), _without(AFTER, "nll_gap_exact_sum_")
    assert report_main(_report_inputs(tmp_path, before, after)) == 0
    quality = json.loads((tmp_path / "report" / "report.json").read_text())["online_quality"]["pruned"]
    assert quality["nll_gap_nats"] == {"mean": 0.0, "count": 16.0, "exact": True}
    assert quality["token_agreement"]["mean"] == pytest.approx((8.8 + 4.8) / 16)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "NLL gap vs dense +0.000 nats/token over 16; token agreement 0.850 over 16\n" in table


def test_report_without_online_metrics_has_null_keys_and_no_lines(tmp_path):
    plain = _ray('ray_sinkserve_requests_total{R1,status="ok",variant="pruned"} 5.0\n')
    assert report_main(_report_inputs(tmp_path, plain, plain.replace("} 5.0", "} 8.0"))) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["online_quality"] is None and report["canary"] is None and report["live_cost"] is None
    table = (tmp_path / "report" / "report.md").read_text()
    assert "Online quality" not in table and "Canary" not in table and "Live cost" not in table
    assert report["counts_agree"] is True


def test_a_restarted_replica_counts_from_zero_and_one_scrape_alone_is_refused(tmp_path, capsys):
    before = _ray('ray_sinkserve_quality_pairs_total{R1,outcome="scored",variant="pruned"} 9.0\n')
    after = before.replace("} 9.0", "} 4.0")  # R1 restarted (same labels) and scored 4 since
    assert report_main(_report_inputs(tmp_path, before, after)) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["online_quality"]["pruned"]["pairs"] == {"scored": 4.0}
    assert report["online_quality"]["pruned"]["nll_gap_nats"] is None
    (tmp_path / "again").mkdir()
    args = _report_inputs(tmp_path / "again", before, after)
    assert report_main(args[:4] + args[6:]) == 2  # --metrics-after left out
    assert "--metrics-before and --metrics-after go together" in capsys.readouterr().err
