"""The checks before any body is read (API key, body limit) and the one error shape, over real
HTTP (uvicorn on 127.0.0.1) with the router's own middleware, handlers and request schema."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI

from serve import api_errors
from serve.guards import API_KEY_ENV, RequestGuard, bearer_token
from serve.local import free_port
from serve.schemas import CompletionRequest

LIMIT = 4096
KEY = "s3cret-key"


def make_app(refusals: list[int]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestGuard)
    api_errors.install(app)
    app.state.max_body_bytes = LIMIT
    app.state.count_refusal = refusals.append

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return {"prompt": body.prompt}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    return app


@pytest.fixture(scope="module")
def server():
    refusals: list[int] = []
    port = free_port()
    config = uvicorn.Config(make_app(refusals), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, refusals
    instance.should_exit = True
    thread.join(timeout=10)


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         chunked: bool = False):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if chunked:
        connection.putrequest(method, path)
        for name, value in {**headers, "Transfer-Encoding": "chunked"}.items():
            connection.putheader(name, value)
        connection.endheaders()
        for start in range(0, len(body), 1000):
            piece = body[start:start + 1000]
            connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.send(b"0\r\n\r\n")
    else:
        connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def error_of(data: bytes) -> dict:
    body = json.loads(data)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


VALID = json.dumps({"model": "sinkserve", "prompt": "hello"}).encode()


@pytest.mark.parametrize("raw, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b'{"model": "m", "prompt": "\xff\xfe"}', None, "UTF-8"),
    (b"[" * 2040 + b"]" * 2040, None, "nested"),  # deeper than Python's JSON parser goes
    (b'{"model": "m", "prompt": "\\ud800"}', "prompt", "prompt"),
    (b'{"model": "m", "prompt": "x", "stream": "yes"}', "stream", "boolean"),
    (b'{"model": "m", "prompt": "x", "max_tokens": true}', "max_tokens", "integer"),
    (b'{"model": "m", "prompt": [true]}', "prompt.0", "integer"),
    (b'{"model": "m", "prompt": "x", "steps": "4"}', "steps", "integer"),
    (b'{"model": "m", "prompt": "   "}', "prompt", "pattern"),
])
def test_bad_bodies_get_400_in_the_one_error_shape(server, raw, param, words):
    port, _ = server
    status, _, data = call(port, "POST", "/v1/completions", raw)
    error = error_of(data)
    assert status == 400 and error["param"] == param, error
    assert words.lower() in error["message"].lower(), error


def test_unknown_path_wrong_method_and_bugs_use_the_error_shape(server):
    port, refusals = server
    before = len(refusals)
    status, _, data = call(port, "GET", "/nowhere")
    assert status == 404 and error_of(data)["type"] == "not_found_error"
    status, headers, data = call(port, "GET", "/v1/completions")
    assert status == 405 and "POST" in headers.get("allow", "") and error_of(data)["param"] is None
    status, _, data = call(port, "GET", "/boom")
    assert status == 500 and "a bug" not in error_of(data)["message"]  # no internals leak to clients
    assert refusals[before:] == [404, 405, 500]  # each refusal is counted


def test_body_limit_from_the_declared_length_and_from_a_chunked_body(server):
    port, refusals = server
    big = json.dumps({"model": "sinkserve", "prompt": "x" * (2 * LIMIT)}).encode()
    status, _, data = call(port, "POST", "/v1/completions", big)
    assert status == 413 and str(LIMIT) in error_of(data)["message"]
    status, _, data = call(port, "POST", "/v1/completions", big, chunked=True)
    assert status == 413 and str(LIMIT) in error_of(data)["message"]
    assert refusals[-2:] == [413, 413]
    status, _, data = call(port, "POST", "/v1/completions", VALID, chunked=True)
    assert status == 200 and json.loads(data) == {"prompt": "hello"}


def test_the_key_is_checked_before_the_body(server, monkeypatch):
    port, refusals = server
    monkeypatch.setenv(API_KEY_ENV, KEY)
    # an invalid body without the key: 401, not 400 (nothing about the body is revealed)
    status, headers, data = call(port, "POST", "/v1/completions", b"{not json")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert error_of(data)["type"] == "authentication_error" and refusals[-1] == 401
    # a body over the limit without the key: still 401
    assert call(port, "POST", "/v1/completions", b"x" * (2 * LIMIT))[0] == 401
    for wrong in ("Bearer nope", "Basic " + KEY, KEY, "Bearer", ""):
        assert call(port, "POST", "/v1/completions", VALID, {"Authorization": wrong})[0] == 401, wrong
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert call(port, "POST", "/v1/completions", VALID, {"Authorization": f"{scheme} {KEY}"})[0] == 200
    # the API's documentation is behind the key too; the health probe is not
    assert call(port, "GET", "/openapi.json")[0] == 401 and call(port, "GET", "/docs")[0] == 401
    assert call(port, "GET", "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(port, "GET", "/healthz")[0] == 200


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bEaReR   abc ") == "abc"
    assert bearer_token("Bearer ") is None and bearer_token("Token abc") is None and bearer_token("") is None
