"""The load generator's accounting, against a small HTTP server on 127.0.0.1 that
speaks the completions SSE protocol and fails on purpose (the end-to-end tests
drive the real Ray Serve app)."""
from __future__ import annotations

import asyncio
import json
import statistics

import aiohttp
from aiohttp import web

from loadtest.arrivals import arrival_offsets
from loadtest.cli import main as loadtest_main
from loadtest.client import RequestRecord, Target, send_completion
from loadtest.runner import Phase, run_phase
from loadtest.summary import summarize_by_variant


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
    assert loadtest_main(["--num-requests", "0"]) == 2
    assert loadtest_main(["--extra", "{bad json"]) == 2
