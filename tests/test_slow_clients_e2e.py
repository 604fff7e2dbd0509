"""Slow and vanishing clients against the real app (Ray Serve on 127.0.0.1, the shared `app`
fixture, a real Prometheus): hundreds of connections that send their body a byte at a time,
some that never finish their headers, and some that leave halfway. Normal requests keep
their latency, the server closes every slow connection at its deadline with a 408, every
request that reached the router is counted once with the right status, and no file
descriptor or task is left behind."""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e import wait_until
from tests.test_serve_e2e import replica_pids, settled
from tests.test_serve_trust_e2e import assert_server_counted, send, server_counts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SLOW_BODIES = 300  # send their body one byte at a time and never finish it
SLOW_HEADERS = 60  # never finish their headers
LEAVERS = 20  # leave while sending their body, once the router has them
TRICKLE_S = 1.0  # one byte per slow client per second
NORMAL = {"model": "sinkserve", "prompt": "Hi", "max_tokens": 4, "steps": 4}
BODY = json.dumps({**NORMAL, "prompt": "a request whose body arrives one byte at a time"}).encode()
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def process_pids(title: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and title in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def router_load() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ABRouter", app_name="sinkserve").load.remote().result(timeout_s=60)


def header_timeouts(app) -> float:
    return sum(app.query("sum(ray_sinkserve_header_timeouts_total)").values())


def timed_normal(base: str) -> float:
    start = time.perf_counter()
    status, variant, _, body = send(base, NORMAL, {"x-dlm-variant": "dense"}, timeout=120)
    assert (status, variant) == (200, "dense"), body
    return time.perf_counter() - start


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:  # a reset after the answer still ends the connection
        pass
    return data


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send `data` one byte per TRICKLE_S until it is sent or the server closes the connection."""
    try:
        for position in range(len(data)):
            await asyncio.sleep(TRICKLE_S)
            writer.write(data[position:position + 1])
            await writer.drain()
    except ConnectionError:
        pass


async def slow_client(host: str, port: int, first: bytes, rest: bytes, leave: asyncio.Event | None = None):
    """Sends `first`, then `rest` a byte at a time; returns (seconds to the server closing the
    connection, what it answered), or None when it left itself on `leave`."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first)
    await writer.drain()
    sending = asyncio.create_task(trickle(writer, rest))
    try:
        if leave is not None:
            await leave.wait()
            return None
        answer = await read_until_closed(reader)
        return time.monotonic() - start, answer
    finally:
        sending.cancel()
        writer.close()


def parse(raw: bytes) -> tuple[int | None, dict, dict | None]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return None, {}, None
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def test_slow_and_vanishing_clients_are_closed_at_the_deadline_counted_and_cost_others_nothing(app):
    base = app.base_url
    host, port = base.removeprefix("http://").split(":")
    [router_pid], [proxy_pid] = replica_pids("ABRouter"), process_pids("ray::ProxyActor")
    for _ in range(3):  # warm
        timed_normal(base)
    unloaded = [timed_normal(base) for _ in range(12)]
    counts_before, header_timeouts_before = settled(lambda: server_counts(app)), header_timeouts(app)
    load_before = router_load()  # first: the handle's connection to the router stays open
    fds_before = {"proxy": open_fds(proxy_pid), "router": open_fds(router_pid)}

    loaded: list[tuple[float, float]] = []  # (start, latency) of normal requests during the attack
    attack_over = threading.Event()

    def normal_traffic():
        while not attack_over.is_set():
            start = time.monotonic()
            loaded.append((start, timed_normal(base)))

    async def attack():
        start, leave, peak = time.monotonic(), asyncio.Event(), {"reading": 0}

        async def watch():
            while True:
                load = await asyncio.to_thread(router_load)
                peak.update(reading=max(peak["reading"], load["reading"]), tasks=max(peak.get("tasks", 0),
                            load["tasks"]), proxy_fds=max(peak.get("proxy_fds", 0), open_fds(proxy_pid)))
                await asyncio.sleep(0.2)

        def clients(count: int, first: bytes, rest: bytes, until: asyncio.Event | None = None) -> list:
            return [asyncio.create_task(slow_client(host, int(port), first, rest, until)) for _ in range(count)]

        watcher = asyncio.create_task(watch())
        # the leavers first: once the router has them all, the flood starts, and a second later they leave
        leavers = clients(LEAVERS, HEAD % len(BODY) + BODY[:1], BODY[1:-1], leave)
        while (await asyncio.to_thread(router_load))["reading"] < LEAVERS:
            assert time.monotonic() - start < 60, "the leavers never reached the router"
            await asyncio.sleep(0.1)
        bodies = clients(SLOW_BODIES, HEAD % len(BODY) + BODY[:1], BODY[1:-1])
        heads = clients(SLOW_HEADERS, b"POST /v1/completions HTTP/1.1\r\n", b"Host: x\r\nAccept: */*\r\n")
        await asyncio.sleep(1.0)
        leave.set()
        await asyncio.gather(*leavers)
        results = await asyncio.gather(*bodies), await asyncio.gather(*heads)
        watcher.cancel()
        peak["attack_s"] = round(time.monotonic() - start, 2)
        return (*results, peak)

    traffic = threading.Thread(target=normal_traffic)
    traffic.start()
    try:
        bodies, heads, peak = asyncio.run(attack())
    finally:
        attack_over.set()
        traffic.join()

    # every slow sender got a 408 in the error shape at its deadline, and its connection was closed
    for (elapsed, raw), deadline in [(b, app.body_timeout_s) for b in bodies] + [(h, app.header_timeout_s)
                                                                              for h in heads]:
        status, headers, body = parse(raw)
        assert status == 408 and headers.get("connection") == "close", raw[:300]
        assert body["error"]["type"] == "timeout" and set(body["error"]) == {"message", "type", "param", "code"}
        assert deadline - 0.5 < elapsed < deadline + 30, elapsed
    body_closed = sorted(elapsed for elapsed, _ in bodies)
    head_closed = sorted(elapsed for elapsed, _ in heads)

    # normal requests kept their latency
    assert len(loaded) >= 5, loaded
    ratio = statistics.median(latency for _, latency in loaded) / statistics.median(unloaded)
    report = {"slow_bodies": SLOW_BODIES, "slow_headers": SLOW_HEADERS, "leavers": LEAVERS,
              "unloaded_median_s": round(statistics.median(unloaded), 3),
              "loaded_median_s": round(statistics.median(latency for _, latency in loaded), 3),
              "loaded_max_s": round(max(latency for _, latency in loaded), 3), "loaded_requests": len(loaded),
              "median_ratio": round(ratio, 2),
              "body_closed_s": [round(body_closed[0], 2), round(body_closed[-1], 2)],
              "headers_closed_s": [round(head_closed[0], 2), round(head_closed[-1], 2)],
              "fds_before": fds_before, "peak": peak, "load_before": load_before}
    print("slow clients:", json.dumps(report))
    assert ratio < 3.0, report

    # every request that reached the router counted once: the slow senders as timeouts, the leavers as
    # cancelled, the normal requests as ok; the late headers never reached it, and the proxy counted them
    expected = Counter({("none", "timeout"): SLOW_BODIES, ("none", "cancelled"): LEAVERS, ("dense", "ok"): len(loaded)})
    assert_server_counted(app, counts_before, expected)
    wait_until(lambda: header_timeouts(app) - header_timeouts_before == SLOW_HEADERS, 120,
               f"{SLOW_HEADERS} header timeouts in Prometheus")

    # nothing left behind: the proxy's and the router's descriptors, the router's requests and tasks
    def settled_after():
        after = {"proxy": open_fds(proxy_pid), "router": open_fds(router_pid)}
        load = router_load()
        done = all(after[k] <= fds_before[k] + 2 for k in after) and load["reading"] == 0 \
            and load["in_flight"] == 0 and load["tasks"] <= load_before["tasks"]
        return (after, load) if done else None

    after, load_after = wait_until(settled_after, 60, f"descriptors and tasks back to {fds_before}, {load_before}")
    print("slow clients, after:", json.dumps({"fds_after": after, "load_after": load_after}))
