"""The A/B report's arithmetic and the server-count check."""
from __future__ import annotations

from loadtest.report import build_report, count_delta, cost_per_million, markdown, server_counts

EXPOSITION = """# HELP ray_sinkserve_requests_total Requests finished
# TYPE ray_sinkserve_requests_total counter
ray_sinkserve_requests_total{WorkerId="a",status="ok",variant="dense"} 10.0
ray_sinkserve_requests_total{WorkerId="b",status="ok",variant="dense"} 2.0
ray_sinkserve_requests_total{WorkerId="c",status="ok",variant="pruned"} 7.0
ray_sinkserve_requests_total{WorkerId="c",status="overloaded",variant="pruned"} 1.0
"""


def _summary(completed, failed, tok_s, p50=100.0):
    return {"completed": completed, "failed": failed, "request_throughput": completed / 10,
            "output_throughput": tok_s, "p50_e2el_ms": p50, "p90_e2el_ms": p50 * 2, "p99_e2el_ms": p50 * 3,
            "p50_ttft_ms": p50 / 2}


def test_server_counts_sum_replicas_and_subtract_the_baseline():
    after = server_counts(EXPOSITION)
    assert after == {"dense": {"ok": 12.0}, "pruned": {"ok": 7.0, "overloaded": 1.0}}
    before = {"dense": {"ok": 2.0}}
    assert count_delta(before, after)["dense"]["ok"] == 10.0


def test_report_compares_capacity_cost_and_counts():
    phases = [
        {"variant_forced": "dense", "phases": [{"concurrency": 4, "summary": {
            "all": _summary(8, 0, 100.0), "dense": _summary(8, 0, 100.0)}}]},
        {"variant_forced": "pruned", "phases": [{"concurrency": 4, "summary": {
            "all": _summary(8, 0, 150.0), "pruned": _summary(8, 0, 150.0)}}]},
        {"variant_forced": None, "phases": [{"concurrency": 4, "summary": {
            "all": _summary(6, 1, 0), "dense": _summary(3, 0, 0), "pruned": _summary(3, 1, 0)}}]},
    ]
    server = {"dense": {"ok": 11.0}, "pruned": {"ok": 11.0}}
    report = build_report(phases, None, server, price_per_hour=3.6, price_unit="USD")
    assert abs(report["throughput_ratio"] - 1.5) < 1e-9
    assert abs(report["best"]["dense"]["cost_per_million_output_tokens"] - 10.0) < 1e-9  # 3.6 / (100*3600) * 1e6
    assert report["client_counts"] == {"dense": {"ok": 11, "failed": 0}, "pruned": {"ok": 11, "failed": 1}}
    assert report["counts_agree"] is True
    assert build_report(phases, None, {"dense": {"ok": 10.0}}, 3.6, "USD")["counts_agree"] is False
    table = markdown(report)
    assert "1.50x" in table and "agree" in table
    assert cost_per_million(0.0, 1.0) is None
