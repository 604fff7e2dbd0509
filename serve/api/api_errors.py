"""One error shape for every status the HTTP API answers: OpenAI's
`{"error": {"message", "type", "param", "code"}}`, with `Retry-After` on 429 and 503.

FastAPI and Starlette answer some failures themselves (invalid JSON, invalid UTF-8,
bodies nested too deep, unknown paths, wrong methods, uncaught bugs) with their own
`{"detail": ...}`; the handlers installed here turn each into this shape, so a client
needs one parser for every error, whichever layer refused the request.

Each request that reaches the router is counted once in `sinkserve_requests_total`: the
guard (serve/api/guards.py) gives it an `Outcome`, the first refusal, timeout or departure of
the client settles it, and a generation endpoint takes it over to count what it serves.
"""
from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")
VARIANT_HEADER = "x-dlm-variant"
RETRY_AFTER_S = {429: 1, 503: 5, 504: 5}  # the default hint when the refusing layer gives none
CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer; never sent, counted `cancelled`
OUTCOME_KEY = "sinkserve.outcome"  # where the guard keeps a request's Outcome in its ASGI scope

# status -> (OpenAI error type, outcome counted by the metrics)
KINDS = {400: ("invalid_request_error", "invalid"), 401: ("authentication_error", "unauthorized"),
         404: ("not_found_error", "invalid"), 405: ("invalid_request_error", "invalid"),
         408: ("timeout", "timeout"), 413: ("invalid_request_error", "invalid"), 429: ("overloaded", "overloaded"),
         CLIENT_CLOSED: ("cancelled", "cancelled"), 500: ("server_error", "error"),
         503: ("unavailable", "unavailable"), 504: ("timeout", "timeout")}


def outcome_of(status: int) -> str:
    """The status label of `sinkserve_requests_total` for an HTTP status."""
    if status < 400:
        return "ok"
    return KINDS.get(status, ("", "invalid" if status < 500 else "error"))[1]


class APIError(Exception):
    """A refusal answered with `status` and the OpenAI error body; `param` names the field or is None."""

    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None,
                 retry_after: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error",))[0]
        self.retry_after = retry_after if retry_after is not None else RETRY_AFTER_S.get(status)
        self.headers = dict(headers or {})

    def response(self, variant: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if variant:
            headers[VARIANT_HEADER] = variant
        return JSONResponse(error_body(self.message, self.kind, self.param), status_code=self.status,
                            headers=headers)


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def validation_error(err: RequestValidationError) -> APIError:
    """A 400 naming the first offending field. Invalid JSON has no field: `param` is null
    (pydantic's location there is a byte offset, which is not a parameter)."""
    errors = err.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        position = first.get("loc", ("body", "?"))[-1]
        return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'syntax error')} "
                             f"at character {position})")
    # a union (text or token ids) fails once per member: the deepest location says most
    paths = [[str(part) for part in e.get("loc", ())[1:] if _is_field(part)] for e in errors]  # drop "body"
    deepest = max(range(len(errors)), key=lambda i: len(paths[i]), default=0)
    param = (".".join(paths[deepest]) or None) if errors else None
    message = errors[deepest].get("msg", "invalid request") if errors else "invalid request"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _is_field(part) -> bool:
    """A field name or list index of an error location, not one of pydantic's union-member tags
    (`function-after[...]`, `list[int]`, `str`)."""
    return isinstance(part, int) or (str(part).isidentifier() and part not in ("str", "int", "float", "bool"))


class Outcome:
    """One request's entry in `sinkserve_requests_total`, written at most once.

    Settled by the first of: a refusal before a variant was chosen (`refused(status)`, counted
    through the deployment's `app.state.count_refusal` with `variant="none"`), the client
    leaving (`refused(CLIENT_CLOSED)`), or a generation endpoint taking the request over
    (`take_over()`), which from then on counts it itself, with its variant. Whatever comes
    after (the 400 FastAPI makes of a body cut short, an error raised after a stream was
    counted) is not counted again."""

    def __init__(self, count_refusal: Callable[[int], None]):
        self._count_refusal = count_refusal
        self.settled = False

    def refused(self, status: int) -> None:
        if not self.settled:
            self.settled = True
            self._count_refusal(status)

    def take_over(self) -> None:
        self.settled = True


def request_outcome(scope: dict) -> Outcome:
    """The request's Outcome (one that counts nothing when no guard runs, as in unit tests)."""
    return scope.get(OUTCOME_KEY) or Outcome(lambda status: None)


def count_refusal(request: Request, status: int) -> None:
    """Count a refusal made before the request reached a variant: once per request, through
    its Outcome, else (no guard) through the deployment's `app.state.count_refusal`."""
    if OUTCOME_KEY in request.scope:
        request.scope[OUTCOME_KEY].refused(status)
        return
    counter = getattr(request.app.state, "count_refusal", None)
    if counter is not None:
        counter(status)


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        count_refusal(request, err.status)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        count_refusal(request, 400)
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals: a body it cannot decode (invalid UTF-8, nesting too deep), 404, 405
        status = err.status_code if 400 <= err.status_code < 600 else 500
        message = {400: "the body is not valid JSON (or not UTF-8, or nested too deeply)",
                   404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(status, str(err.detail))
        count_refusal(request, status)
        return APIError(status, message, headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        count_refusal(request, 500)
        return APIError(500, f"internal error: {type(err).__name__}").response()
