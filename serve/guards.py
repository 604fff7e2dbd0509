"""Checks that run before any body is read: the API key, then the body size limit.

A plain ASGI middleware, so a wrong key is refused (401) before the body is parsed
or validated, and a body over the limit is refused (413) from its declared length,
or as soon as a chunked body crosses it, without being held in memory whole.
`/healthz` stays open for probes; `/docs` and `/openapi.json` need the key like the API.
"""
from __future__ import annotations

import hmac
import json
import os

from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException

from serve.api_errors import error_body

API_KEY_ENV = "SINKSERVE_API_KEY"
OPEN_PATHS = frozenset({"/healthz"})
DEFAULT_MAX_BODY_BYTES = 1 << 20


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive (RFC 9110)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class RequestGuard:
    """The limit and the refusal counter are read from the app's `state` (`max_body_bytes`,
    `count_refusal`), which the deployment sets once it knows its configuration."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        limit = getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        count_refusal = getattr(state, "count_refusal", lambda status: None)

        async def refuse(status: int, message: str, kind: str, extra: dict | None = None) -> None:
            count_refusal(status)
            await _send_error(send, status, message, kind, extra)

        def too_large(size: int) -> str:
            return f"the request body ({size} bytes or more) exceeds the limit of {limit} bytes"

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = os.environ.get(API_KEY_ENV)
        if key and scope.get("path") not in OPEN_PATHS:
            token = bearer_token(headers.get("authorization", ""))
            if token is None or not hmac.compare_digest(token.encode(), key.encode()):
                return await refuse(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    "authentication_error", {"www-authenticate": "Bearer"})
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await refuse(413, too_large(int(declared)), "invalid_request_error")

        received = 0

        async def limited_receive():
            nonlocal received
            try:
                message = await receive()
            except TaskCancelledError:  # Ray Serve's way to say the client left (seen by streams' listeners)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # answered by the app's error handlers (FastAPI passes HTTPException on)
                    raise HTTPException(413, detail=too_large(received))
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, message: str, kind: str, extra: dict | None = None) -> None:
    body = json.dumps(error_body(message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
