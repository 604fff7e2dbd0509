"""The load tester against the real app: its counts equal the server's Prometheus counts per
variant, and failures (requests the engine refuses) are counted as failed on both sides."""
from __future__ import annotations

import json

import pytest

from loadtest.cli import main as loadtest_main
from tests.e2e import wait_until
from tests.test_serve_e2e import settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _server(app, status: str) -> dict[str, float]:
    promql = f'sum by (variant) (ray_sinkserve_requests_total{{application="sinkserve", status="{status}"}})'
    return {json.loads(k).get("variant"): v for k, v in app.query(promql).items()}


def _run(app, tmp_path, name: str, extra: dict, *options: str, requests: int = 24) -> dict:
    out = tmp_path / name
    code = loadtest_main(["--base-url", app.base_url, "--concurrencies", "4", "--num-requests", str(requests),
                          "--max-tokens", "4", "--max-seconds", "300", "--extra", json.dumps(extra),
                          "--out-dir", str(out), "--quiet", *options])
    assert code == 0
    return json.loads((out / "summary.json").read_text())["phases"][0]["summary"]


def test_client_counts_equal_server_counts_including_failures(app, tmp_path):
    ok_before = settled(lambda: _server(app, "ok"))
    invalid_before = settled(lambda: _server(app, "invalid"))
    good = _run(app, tmp_path, "good", {"steps": 4})
    # 4 tokens in blocks of 2 is 2 blocks; 3 steps do not divide among them: the engine refuses (HTTP 400)
    bad = _run(app, tmp_path, "bad", {"steps": 3, "block_length": 2})
    assert good["all"]["completed"] == 24 and good["all"]["failed"] == 0
    assert bad["all"]["completed"] == 0 and bad["all"]["failed"] == 24
    assert bad["all"]["errors"] == {"http_400": 24}
    variants = ("dense", "pruned")
    expected_ok = {v: ok_before.get(v, 0) + good.get(v, {}).get("completed", 0) for v in variants}
    expected_invalid = {v: invalid_before.get(v, 0) + bad.get(v, {}).get("failed", 0) for v in variants}
    wait_until(lambda: all(_server(app, "ok").get(v, 0) == expected_ok[v] for v in variants), 120,
               f"server ok counts {expected_ok}")
    wait_until(lambda: all(_server(app, "invalid").get(v, 0) == expected_invalid[v] for v in variants), 120,
               f"server invalid counts {expected_invalid}")


def test_chat_load_reads_streamed_deltas(app, tmp_path):
    # the pruned artifact of the e2e fixture has a chat template, the embedded (dense) model none
    chat = _run(app, tmp_path, "chat", {"steps": 4}, "--chat", "--variant", "pruned", requests=8)
    assert chat["all"]["completed"] == 8 and chat["all"]["failed"] == 0
    assert chat["pruned"]["total_output_tokens"] > 0 and chat["pruned"]["total_input_tokens"] > 8 * 5
    refused = _run(app, tmp_path, "chat-dense", {"steps": 4}, "--chat", "--variant", "dense", requests=4)
    assert refused["all"]["failed"] == 4 and refused["all"]["errors"] == {"http_400": 4}


def test_vllm_command_line_writes_vllm_fields(app, tmp_path):
    # only `vllm bench serve` flag names (plus where to write and --quiet); 4 tokens in blocks of 2: two chunks
    out = tmp_path / "vllm"
    code = loadtest_main(["--base-url", app.base_url, "--num-prompts", "8", "--request-rate", "inf",
                          "--max-concurrency", "4", "--percentile-metrics", "ttft,tpot,itl,e2el",
                          "--metric-percentiles", "50,99", "--goodput", "e2el:100000", "--output-len", "4",
                          "--extra-body", json.dumps({"steps": 4, "block_length": 2}),
                          "--out-dir", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "summary.json").read_text())
    [point] = report["phases"]
    assert (point["request_rate"], point["max_concurrency"], report["num_prompts"]) == ("inf", 4, 8)
    s = point["summary"]["all"]
    assert s["completed"] == 8 and s["failed"] == 0
    assert s["total_output_tokens"] > 0 and s["total_input_tokens"] > 0 and s["duration"] > 0
    assert 0 < s["request_goodput"] <= s["request_throughput"]
    assert 1 <= s["max_concurrent_requests"] <= 4 and s["max_output_tokens_per_s"] > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert s[f"p99_{metric}_ms"] >= s[f"p50_{metric}_ms"] >= 0, metric  # NaN (no values) fails too
        assert {f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"} <= set(s)
        assert f"p90_{metric}_ms" not in s
    assert s["p50_ttft_ms"] <= s["p50_e2el_ms"]
