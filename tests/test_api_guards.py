"""The checks before any body is read (API key, body limit), the deadlines for reading a
request, and the one error shape, over real HTTP (uvicorn on 127.0.0.1) with the router's own
middleware, handlers and request schema."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.api import api_errors, guards
from serve.api.guards import API_KEY_ENV, RequestGuard, bearer_token, with_header_deadline
from serve.api.schemas import CompletionRequest
from serve.local import free_port

LIMIT = 4096
KEY = "s3cret-key"
BODY_TIMEOUT_S = 1.0
MAX_READING = 4


def make_app(refusals: list[int]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestGuard)
    api_errors.install(app)
    app.state.max_body_bytes = LIMIT
    app.state.body_timeout_s = BODY_TIMEOUT_S
    app.state.max_reading_requests = MAX_READING
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


@contextmanager
def run_server(app, **options):
    """A uvicorn server on a free loopback port in a thread: yields (port, server)."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port, instance
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    refusals: list[int] = []
    with run_server(make_app(refusals)) as (port, _):
        yield port, refusals


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         chunked: bool = False):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **(headers or {})}
    try:
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
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered before the body ended and closed (a refusal): its answer is still readable
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


# ---- slow and vanishing clients ------------------------------------------------------------

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n")


def slow_client(port: int, body: bytes = VALID, sent: int = 5) -> socket.socket:
    """A client that sent its headers and `sent` bytes of its body, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(HEAD % len(body) + body[:sent])
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def parse(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def wait_for(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed(server):
    port, refusals = server
    before = len(refusals)
    start = time.monotonic()
    status, headers, body = parse(read_until_closed(slow_client(port)))
    elapsed = time.monotonic() - start
    assert status == 408 and headers["connection"] == "close", headers
    error = error_of(body)
    assert error["type"] == "timeout" and f"{BODY_TIMEOUT_S:g} s" in error["message"], error
    assert BODY_TIMEOUT_S - 0.1 <= elapsed < BODY_TIMEOUT_S + 5, elapsed
    assert refusals[before:] == [408]  # counted once, as a timeout
    assert api_errors.outcome_of(408) == "timeout"


def test_a_deadline_counts_the_whole_body_not_the_pause_between_bytes(server):
    port, refusals = server
    before = len(refusals)
    sock = slow_client(port, sent=1)
    start = time.monotonic()
    for position in range(1, len(VALID)):  # one byte every 50 ms: never idle for long, late all the same
        if time.monotonic() - start > BODY_TIMEOUT_S + 0.5:
            break
        try:
            sock.sendall(VALID[position:position + 1])
        except OSError:  # the server answered and closed
            break
        time.sleep(0.05)
    status, _, _ = parse(read_until_closed(sock))
    assert status == 408 and refusals[before:] == [408]


def test_a_client_that_leaves_while_sending_its_body_is_counted_once_as_cancelled(server):
    port, refusals = server
    before = len(refusals)
    for left in range(1, 6):
        slow_client(port).close()
        wait_for(lambda: len(refusals) - before >= left)
    time.sleep(BODY_TIMEOUT_S + 0.3)  # nothing more comes later (no 400 from the body cut short, no 408)
    assert refusals[before:] == [api_errors.CLIENT_CLOSED] * 5
    assert api_errors.outcome_of(api_errors.CLIENT_CLOSED) == "cancelled"


def test_bodies_arriving_at_once_are_bounded_and_the_excess_refused_at_once(server):
    port, refusals = server
    before = len(refusals)
    held = [slow_client(port) for _ in range(MAX_READING)]
    time.sleep(0.3)  # all of them are in the guard, reading
    start = time.monotonic()
    status, headers, body = parse(read_until_closed(slow_client(port)))
    assert time.monotonic() - start < BODY_TIMEOUT_S  # at once, not at the deadline
    assert status == 429 and headers["retry-after"] == "1" and headers["connection"] == "close", headers
    assert error_of(body)["type"] == "overloaded"
    assert [parse(read_until_closed(sock))[0] for sock in held] == [408] * MAX_READING
    assert sorted(refusals[before:]) == [408] * MAX_READING + [429]
    assert call(port, "POST", "/v1/completions", VALID)[0] == 200  # the slots are free again


def test_an_answer_before_the_body_arrived_closes_the_connection(server, monkeypatch):
    port, refusals = server
    monkeypatch.setenv(API_KEY_ENV, KEY)
    sock = slow_client(port)  # no key: refused before the body is read
    status, headers, _ = parse(read_until_closed(sock))
    assert status == 401 and headers["connection"] == "close"
    monkeypatch.delenv(API_KEY_ENV)
    big = json.dumps({"model": "m", "prompt": "x" * (2 * LIMIT)}).encode()
    sock = slow_client(port, big, sent=0)  # over the limit by its declared length
    status, headers, _ = parse(read_until_closed(sock))
    assert status == 413 and headers["connection"] == "close"


# the header deadline (Serve's proxy runs uvicorn; serve.api.guards.proxy_callback installs it there)

HEADER_TIMEOUT_S = 0.5


@pytest.fixture(scope="module", params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def deadline_server(request):
    timeouts: list[int] = []
    protocol = with_header_deadline(request.param, HEADER_TIMEOUT_S, lambda: timeouts.append(1))
    with run_server(make_app([]), http=protocol, timeout_keep_alive=30) as (port, _):
        yield port, timeouts


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_is_closed(deadline_server):
    port, timeouts = deadline_server
    before = len(timeouts)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    start = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
    status, headers, body = parse(read_until_closed(sock))
    assert HEADER_TIMEOUT_S - 0.1 <= time.monotonic() - start < HEADER_TIMEOUT_S + 5
    assert status == 408 and headers["connection"] == "close" and error_of(body)["type"] == "timeout"
    assert len(timeouts) == before + 1
    # a connection that never sends anything is closed without an answer (and not counted)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert read_until_closed(sock) == b"" and len(timeouts) == before + 1


def test_the_header_deadline_applies_to_each_request_of_a_kept_alive_connection(deadline_server):
    port, _ = deadline_server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(3):  # complete requests, with pauses longer than the deadline between them
        connection.request("POST", "/v1/completions", body=VALID, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"prompt": "hello"}
        time.sleep(HEADER_TIMEOUT_S * 1.5)
    sock = connection.sock
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request's headers stall
    status, _, _ = parse(read_until_closed(sock))
    assert status == 408


def test_the_proxy_callback_installs_the_deadline_and_adds_no_middleware(monkeypatch):
    from uvicorn import config
    from uvicorn.importer import import_from_string

    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", config.HTTP_PROTOCOLS["auto"])  # restored afterwards
    monkeypatch.setenv(guards.HEADER_TIMEOUT_ENV, "2.5")
    assert guards.proxy_callback() == []
    protocol = import_from_string(config.HTTP_PROTOCOLS["auto"])  # what uvicorn's Config.load resolves
    assert protocol is guards.PROXY_PROTOCOL and issubclass(protocol, HttpToolsProtocol)
    assert list(guards.PROXY_ENV.values()) == ["serve.api.guards.proxy_callback"]
    for raw, expected in (("2.5", 2.5), ("", guards.DEFAULT_HEADER_TIMEOUT_S), ("0", guards.DEFAULT_HEADER_TIMEOUT_S),
                          ("soon", guards.DEFAULT_HEADER_TIMEOUT_S), ("inf", guards.DEFAULT_HEADER_TIMEOUT_S)):
        monkeypatch.setenv(guards.HEADER_TIMEOUT_ENV, raw)
        assert guards.header_timeout_s() == expected, raw
