"""End to end, as an attacker and a careless client would use the real app (Ray Serve on
127.0.0.1, the embedded model as `dense`, a 2:4 artifact as `pruned`, a real Prometheus):
one request's failure stays that request's, limits apply before work, every outcome is
counted per variant, and a replica killed under load costs its in-flight requests nothing."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e import wait_until
from tests.test_serve_e2e import replica_pids, settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
SMALL = {"max_tokens": 4, "steps": 4}
OUTCOME = {200: "ok", 400: "invalid", 401: "unauthorized", 404: "invalid", 413: "invalid", 429: "overloaded",
           500: "error", 503: "unavailable", 504: "timeout"}


def send(base_url: str, body: dict | bytes, headers: dict | None = None, path: str = "/v1/completions",
         timeout: float = 300):
    """(status, variant header, headers, parsed body) of one real HTTP request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, text = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, head, text = err.code, err.headers, err.read()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text.decode(errors="replace")
    return status, head.get("x-dlm-variant"), head, parsed


def client_count(results) -> Counter:
    """What the router must have counted for these results: (variant or 'none', outcome)."""
    return Counter((variant or "none", OUTCOME[status]) for status, variant, _, _ in results)


def server_counts(app) -> Counter:
    rows = app.query('sum by (variant, status) (ray_sinkserve_requests_total{application="sinkserve"})')
    return Counter({(json.loads(k)["variant"], json.loads(k)["status"]): v for k, v in rows.items()})


def delta(after: Counter, before: Counter) -> Counter:
    return Counter({key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0)})


def assert_server_counted(app, before: Counter, expected: Counter) -> None:
    try:
        wait_until(lambda: delta(server_counts(app), before) == expected, 120, f"Prometheus counts {dict(expected)}")
    except TimeoutError:
        with urllib.request.urlopen(app.metrics_url, timeout=30) as response:
            exposed = [line for line in response.read().decode().splitlines() if "sinkserve_requests_total" in line]
        raise AssertionError(f"Prometheus has {dict(delta(server_counts(app), before))} more than before, expected "
                             f"{dict(expected)}; the app exposes {exposed}; router log: {router_log_tail()}") from None


def router_log_tail() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "\n".join(path.read_text()[-6000:] for path in logs.glob("replica_sinkserve_ABRouter_*.log"))


def variant_down_total(app) -> float:
    return sum(app.query('sum(ray_sinkserve_ab_variant_down_total{application="sinkserve"})').values())


def health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/healthz", timeout=30) as response:
        return json.loads(response.read())


def test_a_hostile_client_never_moves_other_users(app):
    base = app.base_url
    users = [f"sticky-{i}" for i in range(12)]
    home = {u: send(base, {"model": "sinkserve", "prompt": "Hi", "user": u, **SMALL})[1] for u in users}
    assert set(home.values()) == {"dense", "pruned"}, home
    before, downs_before = settled(lambda: server_counts(app)), variant_down_total(app)
    attacks = [  # each aimed at the pruned variant; each must be that request's 400 and nothing else
        (b'{"model": "sinkserve", "prompt": "\\ud800", "max_tokens": 4}', "/v1/completions", "prompt"),
        (b'{"prompt": "a\\udfffb", "max_tokens": 4}', "/v1/generate", "prompt"),
        (b'{"model": "sinkserve", "messages": [{"role": "user", "content": "\\ud83d"}]}', "/v1/chat/completions",
         "messages.0.content"),
        # past the schema, refused by the replica before tokenising (too many characters for any sequence)
        (json.dumps({"model": "sinkserve", "prompt": "z" * 200_000, "max_tokens": 4}).encode(), "/v1/completions",
         "prompt"),
    ]
    results, attacked = [], []
    stop = threading.Event()

    def attacker():
        while not stop.is_set():
            for raw, path, param in attacks:
                attacked.append((send(base, raw, {"x-dlm-variant": "pruned"}, path), param))

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda u: send(base, {"model": "sinkserve", "prompt": "Again", "user": u,
                                                          **SMALL}), users * 4))
    finally:
        stop.set()
        thread.join()
    assert len(attacked) >= len(attacks)
    for (status, _, _, body), param in attacked:
        assert status == 400 and body["error"]["param"] == param, body
    assert all(status == 200 for status, _, _, _ in results)
    assert [variant for _, variant, _, _ in results] == [home[u] for u in users * 4]  # nobody moved
    assert {v: h["status"] for v, h in health(base)["variants"].items()} == {"dense": "up", "pruned": "up"}
    assert_server_counted(app, before, client_count(results) + client_count(r for r, _ in attacked))
    assert variant_down_total(app) == downs_before


def test_large_bodies_are_refused_before_work_and_do_not_stall_others(app):
    base = app.base_url
    small = {"model": "sinkserve", "prompt": "SELECT", **SMALL}
    baseline = min(timed(lambda: send(base, small, {"x-dlm-variant": "pruned"})) for _ in range(3))
    huge = json.dumps({"model": "sinkserve", "prompt": "w " * 500_000, **SMALL}).encode()  # 1 MB, under 1 MiB
    too_big = b'{"model": "sinkserve", "prompt": "' + b"x" * (2 << 20) + b'"}'
    with ThreadPoolExecutor(5) as pool:
        bigs = [pool.submit(send, base, huge, {"x-dlm-variant": "pruned"}) for _ in range(4)]
        time.sleep(0.05)
        loaded = timed(lambda: send(base, small, {"x-dlm-variant": "pruned"}))
        refused = [f.result() for f in bigs]
    for status, variant, _, body in refused:
        assert (status, variant, body["error"]["param"]) == (400, "pruned", "prompt"), body
        assert "too long" in body["error"]["message"]
    assert loaded < baseline + 2.0, (loaded, baseline)
    status, _, headers, body = send(base, too_big)
    assert status == 413 and "1048576" in body["error"]["message"]
    assert health(base)["variants"]["pruned"]["status"] == "up"


def timed(call) -> float:
    start = time.perf_counter()
    status = call()[0]
    assert status == 200
    return time.perf_counter() - start


def test_a_client_that_leaves_is_counted_as_cancelled(app):
    base = app.base_url
    before = settled(lambda: server_counts(app))
    host, port = base.removeprefix("http://").split(":")
    for stream in (False, True):
        body = json.dumps({"model": "sinkserve", "prompt": "Write a long story " * 100, "max_tokens": 32,
                           "steps": 32, "stream": stream}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"x-dlm-variant: dense\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            if stream:  # the first event has arrived: the router is streaming it
                received = b""
                while b"data: " not in received:
                    chunk = sock.recv(65536)
                    assert chunk, f"the stream ended before its first event: {received!r}"
                    received += chunk
            else:  # the dense engine is running it
                deadline = time.monotonic() + 60
                while health(base)["variants"]["dense"].get("running", 0) < 1:
                    assert time.monotonic() < deadline, "the request never ran"
                    time.sleep(0.05)
        # the client is gone; the router notices and counts it
    assert_server_counted(app, before, Counter({("dense", "cancelled"): 2}))
    wait_until(lambda: health(base)["variants"]["dense"]["running"] == 0, 60, "the engine to drop the requests")


def test_a_burst_is_refused_fast_with_retry_after_and_counted(app):
    base = app.base_url
    before = settled(lambda: server_counts(app))
    body = {"model": "sinkserve", "prompt": "Burst", "max_tokens": 16, "steps": 16}
    start = time.monotonic()
    with ThreadPoolExecutor(64) as pool:  # more at once than the router holds (24 in this app)
        results = list(pool.map(lambda i: send(base, {**body, "user": f"burst-{i}"}, timeout=120), range(96)))
    statuses = Counter(status for status, _, _, _ in results)
    assert set(statuses) <= {200, 429} and statuses[200] >= 24 and statuses[429] >= 1, statuses
    for status, _, headers, response in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1 and response["error"]["type"] == "overloaded", response
    assert time.monotonic() - start < 120  # nothing hung
    assert_server_counted(app, before, client_count(results))


def test_killing_a_replica_under_load_loses_no_request_and_every_outcome_is_counted(app):
    base = app.base_url
    before = settled(lambda: server_counts(app))
    pruned = replica_pids("ModelReplica-pruned")
    assert len(pruned) == 1
    body = {"model": "sinkserve", "prompt": "Load", "max_tokens": 16, "steps": 16}
    with ThreadPoolExecutor(6) as pool:
        free = [pool.submit(send, base, {**body, "user": f"load-{i}"}) for i in range(48)]
        forced = [pool.submit(send, base, body, {"x-dlm-variant": "pruned"}) for _ in range(12)]
        time.sleep(1.0)
        os.kill(pruned[0], signal.SIGKILL)
        free = [f.result(timeout=300) for f in free]  # no hang
        forced = [f.result(timeout=300) for f in forced]
    # users who were not forced lose nothing: in-flight requests are sent again, new ones fall back
    assert Counter(status for status, _, _, _ in free) == {200: 48}, Counter(s for s, _, _, _ in free)
    # a request forced to the dead variant gets 200 (before the kill) or 503 with Retry-After, never 500
    for status, variant, headers, response in forced:
        assert variant == "pruned" and status in (200, 503), response
        if status == 503:
            assert int(headers["Retry-After"]) > 0 and response["error"]["type"] == "unavailable"
    assert_server_counted(app, before, client_count(free) + client_count(forced))
    # Serve restarts the replica; the variant comes back by itself
    wait_until(lambda: send(base, {**body, **SMALL}, {"x-dlm-variant": "pruned"})[0] == 200, 300,
               "the pruned replica to come back")
    assert health(base)["variants"]["pruned"]["status"] == "up"
    assert replica_pids("ModelReplica-pruned") and replica_pids("ModelReplica-pruned") != pruned
