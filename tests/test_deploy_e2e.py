"""End to end: `deploy/` against the running app (tests/conftest.py's `app`, dense + pruned on
this CPU). After a short load, every metric the dashboard and the rules read is in Ray's
exposition; a real Prometheus started with deploy/prometheus/prometheus-local.yml (its target
pointed at the app's metrics port) answers every recording rule and evaluates every rule
without error; and every dashboard query returns data."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import yaml

from serve.local import free_port
from tests.e2e import wait_until
from tests.test_deploy import EXPORTED, PROMETHEUS, dashboard_exprs, metric_names, recording_rules, series_names, \
    used_metric_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SMALL = {"max_tokens": 4, "steps": 4}
USERS = [f"deploy-user-{i}" for i in range(8)]  # sticky 50/50 with the default salt: both variants get some
# Series that only appear in the exposition once their event happened: a variant down, a retry,
# a quality check run (its copy, its outcome, its gap and agreement), a canary decision; the
# canary's weight only while a canary policy is configured, the live cost only with prices
# configured and traffic in the router's cost window.
EVENT_ONLY = {"ray_sinkserve_ab_fallbacks_total", "ray_sinkserve_ab_shadow_requests_total",
              "ray_sinkserve_ab_retries_total", "ray_sinkserve_ab_variant_down_total",
              "ray_sinkserve_quality_pairs_total",
              "ray_sinkserve_quality_nll_gap_nats_bucket", "ray_sinkserve_quality_nll_gap_nats_sum",
              "ray_sinkserve_quality_nll_gap_nats_count",
              "ray_sinkserve_quality_token_agreement_bucket", "ray_sinkserve_quality_token_agreement_sum",
              "ray_sinkserve_quality_token_agreement_count",
              "ray_sinkserve_quality_nll_gap_exact_sum_nats_total",
              "ray_sinkserve_quality_token_agreement_exact_sum_total",
              "ray_sinkserve_canary_decisions_total", "ray_sinkserve_canary_weight",
              "ray_sinkserve_cost_per_million_output_tokens"}

# The router's decision series (quality checks, live cost, canary) need a canary app with prices and
# quality checks: the rules and panels that read them are checked by tests/test_rollout_e2e.py.
DECISION = {name for name in EVENT_ONLY if any(word in name for word in ("quality", "canary", "cost_per"))}


def reads_decisions(record_or_expr: str) -> bool:
    names = metric_names(record_or_expr) | {record_or_expr}
    return any(word in name for name in names for word in ("quality", "canary", "cost_per")) \
        or bool(names & DECISION)


def post(base_url: str, body: dict, headers: dict | None = None) -> tuple[int, str | None]:
    request = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        return response.status, response.headers.get("x-dlm-variant")


def send_wave(base_url: str) -> set[str]:
    """Requests forced to each variant and assigned by the router; the variants the router chose."""
    calls = [({"model": "sinkserve", "prompt": "x", "user": u, **SMALL}, None) for u in USERS]
    calls += [({"model": "sinkserve", "prompt": "x", **SMALL}, {"x-dlm-variant": v}) for v in ("dense", "pruned")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda call: post(base_url, *call), calls))
    assert all(status == 200 for status, _ in results), results
    return {variant for (_, variant), (_, headers) in zip(results, calls) if headers is None}


@contextmanager
def local_prometheus(metrics_url: str, workdir):
    """Prometheus with deploy/prometheus/prometheus-local.yml, changed only where this app differs:
    its metrics port (a free one here, 8080 in the file) and the rule files' absolute paths."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (scripts/setup.sh installs the Debian package)")
    target = urllib.parse.urlparse(metrics_url)
    config = yaml.safe_load((PROMETHEUS / "prometheus-local.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == target.path
    job["static_configs"] = [{"targets": [target.netloc]}]
    path = workdir / "prometheus-local.yml"
    path.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen([binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
                                f"--web.listen-address={base.removeprefix('http://')}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def api(endpoint: str, **params) -> dict:
        url = f"{base}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode} (config {path})")
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(ready, 60, "prometheus ready")
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def variants_of(api, promql: str) -> set[str]:
    return {r["metric"].get("variant") for r in api("query", query=promql)["result"]}


@pytest.fixture(scope="module")
def loaded(app, tmp_path_factory):
    """Two waves of load: the first creates the series (a series' first sample is no increase for
    rate()), the second, once Prometheus has scraped them, gives every rate a value."""
    with local_prometheus(app.metrics_url, tmp_path_factory.mktemp("prometheus-local")) as api:
        assert send_wave(app.base_url) == {"dense", "pruned"}
        both = {"dense", "pruned"}
        for promql in ("ray_sinkserve_request_latency_seconds_count", "ray_sinkserve_ab_assignments_total"):
            wait_until(lambda: variants_of(api, promql) >= both, 90, f"{promql} for both variants in Prometheus")
        send_wave(app.base_url)
        yield api


def exposition_names(metrics_url: str) -> set[str]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_dashboard_and_rules_read_is_exported(app, loaded):
    expected = (set().union(*used_metric_names().values()) & series_names()) - EVENT_ONLY
    assert len(expected) >= len(EXPORTED) - len(EVENT_ONLY)

    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while (left := expected - exposition_names(app.metrics_url)) and time.monotonic() < deadline:
        # Ray drops a gauge ~20 s after its last update; the engines update theirs at each step
        for variant in ("dense", "pruned"):
            post(app.base_url, {"model": "sinkserve", "prompt": "x", **SMALL}, {"x-dlm-variant": variant})
        time.sleep(2)
    assert not left, f"not in {app.metrics_url}: {sorted(left)}"


def test_local_prometheus_answers_every_recording_rule(loaded):
    api = loaded
    records = {record: expr for record, expr in recording_rules().items() if not reads_decisions(record)}

    def unanswered() -> dict[str, object]:
        bad = {}
        for record in records:
            result = api("query", query=record)["result"]
            values = [float(r["value"][1]) for r in result]
            if not values or any(math.isnan(v) for v in values):
                bad[record] = values
        return bad or None

    deadline = time.monotonic() + 90
    while (left := unanswered()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, f"recording rules without a value: {left}"
    for record in records:
        if record.startswith("variant:"):
            # ("none": requests refused before a variant was chosen, when earlier tests sent some)
            assert variants_of(api, record) - {"none"} == {"dense", "pruned"}, record
    groups = api("rules")["groups"]
    assert {rule["name"] for group in groups for rule in group["rules"]} >= set(recording_rules())
    broken = {rule["name"]: rule.get("lastError") for group in groups for rule in group["rules"]
              if rule["health"] != "ok"}
    assert not broken, broken


def test_every_dashboard_query_returns_data(app, loaded):
    exprs = {where: expr for where, expr in dashboard_exprs(rate_interval="1m").items() if not reads_decisions(expr)}

    def empty() -> list[str]:
        return [where for where, expr in exprs.items() if not app.query(expr)] or None

    deadline = time.monotonic() + 60
    while (left := empty()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, f"dashboard queries with no data: {left}"
