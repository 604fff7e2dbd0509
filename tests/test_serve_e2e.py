"""End to end: Ray Serve on this CPU with the embedded model as `dense` and a 2:4
artifact of it as `pruned`, real HTTP, the official OpenAI client, and a real
Prometheus server scraping the app's metrics."""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
SMALL = {"max_tokens": 4, "steps": 4}


def post(base_url: str, body: dict | bytes, headers: dict | None = None, path: str = "/v1/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.headers.get("x-dlm-variant"), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("x-dlm-variant"), err.read().decode()


def settled(read, pause_s: float = 12.0, timeout_s: float = 120.0):
    """A reading that no longer changes over longer than Ray's export period (10 s): traffic
    sent by earlier tests may still be on its way to Prometheus."""
    import time

    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(pause_s)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_split_is_balanced_sticky_and_counted_by_prometheus(app):
    base_url, query = app.base_url, app.query
    promql = 'sum by (variant) (ray_sinkserve_requests_total{application="sinkserve", status="ok"})'

    def counts():
        return {json.loads(k).get("variant"): v for k, v in query(promql).items()}

    before = settled(counts)
    users = [f"user-{i}" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda u: post(base_url, {"model": "sinkserve", "prompt": "The table", "user": u,
                                                          **SMALL}), users))
    assert all(status == 200 for status, _, _ in results)
    assignment = {u: served for u, (_, served, _) in zip(users, results)}
    share = Counter(assignment.values())["pruned"] / 200
    assert 0.5 - 4 * (0.25 / 200) ** 0.5 < share < 0.5 + 4 * (0.25 / 200) ** 0.5  # within 4 sigma
    for user in users[:30]:  # the same user always gets the same variant (by body field or header)
        assert post(base_url, {"model": "sinkserve", "prompt": "Again", "user": user, **SMALL})[1] == assignment[user]
        assert post(base_url, {"model": "sinkserve", "prompt": "Again", **SMALL}, {"x-user-id": user})[1] == assignment[user]
    sent = Counter(assignment.values()) + Counter(assignment[u] for u in users[:30] for _ in range(2))
    expected = {v: before.get(v, 0) + sent[v] for v in ("dense", "pruned")}
    wait_until(lambda: counts() == expected, 120, f"prometheus counts {expected}, last {counts()}")


def test_openai_client_completes_and_streams(app):
    import openai

    base_url = app.base_url
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data][0] == "sinkserve"
    completion = client.completions.create(model="sinkserve", prompt="The function returns", max_tokens=8,
                                           extra_body={"steps": 8})
    assert completion.usage.completion_tokens <= 8 and completion.choices[0].finish_reason in ("stop", "length")
    cached = client.completions.create(model="sinkserve", prompt="The function returns", max_tokens=8,
                                       extra_body={"steps": 8, "block_length": 4, "dual_cache": True})
    assert cached.usage.completion_tokens <= 8 and cached.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model="sinkserve", prompt="The function returns", max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert text.strip() or chunks[-1].usage.completion_tokens >= 1


def test_openai_chat_completions_use_the_chat_template(app):
    import openai

    client = openai.OpenAI(base_url=app.base_url + "/v1", api_key="unused")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a file?"}]
    chat = client.chat.completions.create(model="sinkserve:pruned", messages=messages, max_tokens=8,
                                          extra_body={"steps": 8})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length") and 1 <= chat.usage.completion_tokens <= 8
    assert chat.usage.prompt_tokens > 10  # the rendered conversation, not just the last message
    chunks = list(client.chat.completions.create(model="sinkserve:pruned", messages=messages, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    # the dense variant's tokenizer has no chat template: a clear 400 naming `messages`
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="sinkserve:dense", messages=messages, max_tokens=8)
    assert "chat template" in str(refused.value) and refused.value.body["param"] == "messages"


def test_forced_variant_is_served_by_that_variant(app):
    base_url = app.base_url
    for variant in ("dense", "pruned", "pruned", "dense"):
        status, served, body = post(base_url, {"model": "sinkserve", "prompt": "SELECT", **SMALL},
                                    {"x-dlm-variant": variant})
        assert status == 200 and served == variant, body
    status, served, _ = post(base_url, {"model": "sinkserve:pruned", "prompt": "SELECT", **SMALL})
    assert (status, served) == (200, "pruned")


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"model": "sinkserve"}, "prompt"),
    ({"model": "sinkserve", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "sinkserve", "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"model": "sinkserve", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "sinkserve", "prompt": "x", "remasking": "nope"}, "remasking"),
    ({"model": "sinkserve", "prompt": "x", "dual_cache": "maybe"}, "dual_cache"),
    ({"model": "sinkserve", "prompt": "x", "stop_token_ids": [3, 10**9]}, "stop_token_ids"),
    ({"model": "sinkserve", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "sinkserve", "prompt": "x", "n": 2}, "n"),
    ({"model": "sinkserve", "prompt": ""}, "prompt"),
    ({"model": "sinkserve", "prompt": "x", "max_tokens": 8, "block_length": 3}, "block_length"),
    ({"model": "sinkserve", "prompt": "x", "max_tokens": 8, "steps": 3, "block_length": 4}, "steps"),
    ({"model": "/etc/passwd", "prompt": "x"}, "model"),
])
def test_malformed_requests_get_4xx_naming_the_field(app, body, param):
    base_url = app.base_url
    status, _, text = post(base_url, body)
    assert 400 <= status < 500, text
    error = json.loads(text)["error"]
    if param:
        assert error["param"] == param or param in error["message"], error


@pytest.mark.parametrize("body, param", [
    ({"model": "sinkserve", "messages": []}, "messages"),
    ({"model": "sinkserve", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "sinkserve", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "sinkserve", "prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
])
def test_malformed_chat_requests_get_400_naming_the_field(app, body, param):
    status, _, text = post(app.base_url, {**body, **SMALL}, path="/v1/chat/completions")
    assert status == 400, text
    assert json.loads(text)["error"]["param"] == param


def test_unknown_variant_header_is_a_400(app):
    status, _, text = post(app.base_url, {"model": "sinkserve", "prompt": "x", **SMALL}, {"x-dlm-variant": "sparse"})
    assert status == 400 and "unknown variant" in text


def replica_pids(deployment: str, app_name: str = "sinkserve") -> list[int]:
    """PIDs of a deployment's replica processes (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and f"ServeReplica:{app_name}:{deployment}" in cmdline:
            pids.append(int(proc.name))
    return pids
