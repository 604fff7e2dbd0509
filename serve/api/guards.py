"""Checks that run before any body is read, and deadlines for reading a request.

`RequestGuard`, a plain ASGI middleware in the router:
- a wrong API key is refused (401) before the body is parsed or validated; `/healthz`
  stays open for probes, `/docs` and `/openapi.json` need the key like the API;
- a body over the limit is refused (413) from its declared length, or as soon as a
  chunked body crosses it, without being held in memory whole;
- a body must arrive whole within `body_timeout_s` of the request reaching the router,
  else 408 (a client sending one byte every few seconds holds nothing for long);
- at most `max_reading_requests` requests may be sending their bodies at once; beyond,
  429 at once, so slow senders never take the slots that Serve gives the router for
  requests being served;
- an answer given before the whole body arrived closes the connection (`Connection:
  close`), so the proxy does not keep reading what the client still sends;
- every request gets an `Outcome` (serve/api/api_errors.py): a client that leaves while
  sending its body is counted once as `cancelled`, a deadline missed as `timeout`.

`proxy_callback`, run by Ray Serve in its HTTP proxy (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
see `PROXY_ENV`): the headers of each request must arrive within `SINKSERVE_HEADER_TIMEOUT_S`
(default 10 s) of its first byte, or of the connection being opened; uvicorn, Serve's HTTP
server, has no such deadline. A late request is answered 408 in the error shape and its
connection closed (a connection that sent nothing is just closed); it never reached the
router, so it is counted in `sinkserve_header_timeouts_total`, not in `requests_total`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os

from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException

from serve.api.api_errors import CLIENT_CLOSED, OUTCOME_KEY, Outcome, error_body

log = logging.getLogger("ray.serve")
API_KEY_ENV = "SINKSERVE_API_KEY"
OPEN_PATHS = frozenset({"/healthz"})
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_READING_REQUESTS = 1024
HEADER_TIMEOUT_ENV = "SINKSERVE_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 10.0
# what the environment of Ray's processes needs (set before Ray starts) for the header deadline
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve.api.guards.proxy_callback"}


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive (RFC 9110)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class RequestGuard:
    """Its settings are read from the app's `state`, which the deployment sets once it knows
    its configuration: `max_body_bytes`, `body_timeout_s`, `max_reading_requests` and
    `count_refusal(status)`. `state.reading_requests` is how many bodies are arriving now."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        limit = getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        body_timeout_s = getattr(state, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S)
        max_reading = getattr(state, "max_reading_requests", DEFAULT_MAX_READING_REQUESTS)
        outcome = scope[OUTCOME_KEY] = Outcome(getattr(state, "count_refusal", lambda status: None))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        arriving = chunked or (declared.isdigit() and int(declared) > 0)  # a body is on its way
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body_timeout_s
        received = 0
        reading = False  # counted in state.reading_requests

        def stop_reading() -> None:
            nonlocal arriving, reading
            arriving = False
            if reading:
                reading = False
                state.reading_requests -= 1

        async def guarded_send(message):
            if message["type"] == "http.response.start" and arriving:  # answered before the body arrived
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                stop_reading()
            await send(message)

        async def refuse(status: int, message: str, kind: str, extra: dict | None = None) -> None:
            outcome.refused(status)
            await _send_error(guarded_send, status, message, kind, extra)

        def too_large(size: int) -> str:
            return f"the request body ({size} bytes or more) exceeds the limit of {limit} bytes"

        async def guarded_receive():
            nonlocal received
            if not arriving:  # the body is in (or there is none): only a disconnect can come
                try:
                    return await receive()
                except TaskCancelledError:  # Ray Serve's way to say the client left (seen by streams' listeners)
                    return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:  # answered by the app's error handlers (FastAPI passes HTTPException on)
                raise HTTPException(408, detail=f"the request body did not arrive within {body_timeout_s:g} s "
                                                "of the request; send it whole, then wait for the answer") from None
            except TaskCancelledError:
                message = {"type": "http.disconnect"}
            if message["type"] == "http.disconnect":  # the client left while sending its body
                outcome.refused(CLIENT_CLOSED)
                stop_reading()
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail=too_large(received))
                if not message.get("more_body", False):
                    stop_reading()
            return message

        key = os.environ.get(API_KEY_ENV)
        if key and scope.get("path") not in OPEN_PATHS:
            token = bearer_token(headers.get("authorization", ""))
            if token is None or not hmac.compare_digest(token.encode(), key.encode()):
                return await refuse(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    "authentication_error", {"www-authenticate": "Bearer"})
        if declared.isdigit() and int(declared) > limit:
            return await refuse(413, too_large(int(declared)), "invalid_request_error")
        if arriving:
            if getattr(state, "reading_requests", 0) >= max_reading:
                return await refuse(429, f"{max_reading} requests are sending their bodies to this router, its "
                                         "limit; retry shortly", "overloaded", {"retry-after": "1"})
            state.reading_requests = getattr(state, "reading_requests", 0) + 1
            reading = True
        try:
            await self.app(scope, guarded_receive, guarded_send)
        except asyncio.CancelledError:  # Serve cancels a request whose client left
            if arriving or scope.get("method") == "POST":  # counted unless an endpoint took it over
                outcome.refused(CLIENT_CLOSED)
            raise
        finally:
            stop_reading()


async def _send_error(send, status: int, message: str, kind: str, extra: dict | None = None) -> None:
    body = json.dumps(error_body(message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- the header deadline, in Serve's HTTP proxy ------------------------------------------

def header_timeout_s() -> float:
    """`SINKSERVE_HEADER_TIMEOUT_S` (a positive number of seconds), else the default."""
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if raw and not value > 0:
        log.warning("%s=%r is not a positive number of seconds; using %g", HEADER_TIMEOUT_ENV, raw,
                    DEFAULT_HEADER_TIMEOUT_S)
    return value if value > 0 and value != float("inf") else DEFAULT_HEADER_TIMEOUT_S


def late_headers_response(timeout_s: float) -> bytes:
    """The raw HTTP/1.1 408 (error shape, `Connection: close`) for headers that came too late."""
    body = json.dumps(error_body(f"the request headers did not arrive within {timeout_s:g} s", "timeout")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def with_header_deadline(protocol: type, timeout_s: float, on_timeout=lambda: None) -> type:
    """`protocol` (uvicorn's HTTP protocol: httptools or h11) with a deadline for each request's
    headers: armed when the connection opens and when the first byte of a request arrives with
    no request in progress, disarmed when uvicorn starts the request (its `cycle` changes).
    Bytes that arrive after an answer and start no complete request (the rest of a body the
    answer did not wait for) meet the same deadline."""

    class HeaderDeadline(protocol):
        _header_timer = None
        _partial = False  # bytes of a request arrived since the timer was armed
        _armed_for = None  # the request cycle in progress when it was armed

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            self._partial = True
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._armed_for:
                self._disarm()  # uvicorn has the headers and runs the request

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._armed_for, self._partial = self.cycle, False
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a websocket
                return
            if self._partial:
                self.transport.write(late_headers_response(timeout_s))
                on_timeout()
            self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline


PROXY_PROTOCOL: type | None = None  # what uvicorn's "auto" HTTP protocol resolves to in Serve's proxy


def proxy_callback() -> list:
    """Ray Serve's HTTP proxy callback (`PROXY_ENV`): called once in the proxy process before it
    starts uvicorn; installs the header deadline there and adds no middleware."""
    global PROXY_PROTOCOL
    from uvicorn import config
    from uvicorn.importer import import_from_string

    from serve.metrics import header_timeouts_counter

    timeout_s, counter = header_timeout_s(), header_timeouts_counter()
    base = import_from_string(config.HTTP_PROTOCOLS["auto"])
    PROXY_PROTOCOL = with_header_deadline(base, timeout_s, lambda: counter.inc(1, tags={"variant": "none"}))
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:PROXY_PROTOCOL"
    log.info("request headers must arrive within %g s (%s)", timeout_s, base.__name__)
    return []
