"""`ABRouter`: the HTTP ingress (FastAPI). It validates requests, assigns each to a
variant (weighted, sticky per user, or forced by the `x-dlm-variant` header),
forwards it to that variant's `ModelReplica`, falls back to another variant when
one is down, and answers in OpenAI's completions or chat completions format (SSE
when streaming).
Every response names the variant that served it.

(No `from __future__ import annotations` here: FastAPI must see the real body
types of the endpoints, which Serve's class-based ingress does not resolve.)
"""

import asyncio
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from serve.metrics import RouterMetrics
from serve.routing import Router, RoutingConfig
from serve.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("ray.serve")
VARIANT_HEADER = "x-dlm-variant"
USER_HEADER = "x-user-id"
API_KEY_ENV = "SINKSERVE_API_KEY"
DOWN_COOLDOWN_S = 10.0

app = FastAPI(title="sinkserve", description="Dense and pruned diffusion LMs behind one A/B endpoint.")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after

    def response(self, variant: str | None = None) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if variant:
            headers[VARIANT_HEADER] = variant
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


@app.exception_handler(HTTPError)
async def _http_error(_request: Request, err: HTTPError) -> JSONResponse:
    return err.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    location = [str(part) for part in first.get("loc", ())[1:]]  # drop "body" / "query"
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request body")
    return HTTPError(400, message, "invalid_request_error", param).response()


# Module-level helpers stay above the deployment class: Serve pickles the ingress class
# with the globals it sees at decoration time.
ENGINE_FIELDS = ("max_tokens", "temperature", "seed", "stop", "stop_token_ids", "steps", "block_length", "remasking",
                 "threshold", "prefix_cache", "dual_cache")


def _request_to_engine(body: CompletionRequest | ChatCompletionRequest | GenerateRequest) -> dict:
    payload = {name: getattr(body, name) for name in ENGINE_FIELDS}
    if isinstance(body, ChatCompletionRequest):
        payload["messages"] = [message.model_dump() for message in body.messages]
    else:
        payload["prompt"] = body.prompt
    return payload


def _openai_response(body: CompletionRequest | ChatCompletionRequest, output: dict) -> dict:
    finish, usage = output["finish_reason"], _usage(output)
    if isinstance(body, ChatCompletionRequest):
        choice = ChatChoice(message=ChatResponseMessage(content=output["text"]), finish_reason=finish)
        return ChatCompletionResponse(model=body.model, choices=[choice], usage=usage).model_dump()
    choice = CompletionChoice(text=output["text"], finish_reason=finish)
    return CompletionResponse(model=body.model, choices=[choice], usage=usage).model_dump()


def _stream_choice(body: CompletionRequest | ChatCompletionRequest, text: str, finish: str | None) -> dict:
    """One streamed choice: `text` for completions, a `delta` for chat (OpenAI's chunk shapes)."""
    if isinstance(body, ChatCompletionRequest):
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": None}
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


async def _prepend(first: dict, events):
    yield first
    async for event in events:
        yield event


def _usage(output: dict) -> Usage:
    usage = output["usage"]
    return Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                 total_tokens=usage["prompt_tokens"] + usage["completion_tokens"])


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class ABRouter:
    def __init__(self, variants: dict[str, DeploymentHandle], model_name: str = "sinkserve",
                 routing: dict | None = None, request_timeout_s: float = 300.0):
        self.handles = variants
        self.model_name = model_name
        self.request_timeout_s = request_timeout_s
        self.metrics = RouterMetrics()
        self.down_until: dict[str, float] = {}
        self.reconfigure(routing or {})

    def reconfigure(self, user_config: dict) -> None:
        """Live changes from `serve deploy` (`user_config`): weights, sticky, shadow, salt."""
        self.router = Router(RoutingConfig.from_user_config(user_config or {}, sorted(self.handles)))
        log.info("routing: %s", self.router.config)

    # ---- helpers ---------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        key = os.environ.get(API_KEY_ENV)
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise HTTPError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in self._model_names():
            raise HTTPError(404, f"model {name!r} does not exist; available: {', '.join(self._model_names())}",
                            "invalid_request_error", "model")

    def _model_names(self) -> list[str]:
        return [self.model_name] + [f"{self.model_name}:{v}" for v in sorted(self.handles)]

    def _down(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(v for v, until in self.down_until.items() if until > now)

    def _assign(self, request: Request, body_model: str | None, user: str | None) -> tuple[str, bool]:
        forced = request.headers.get(VARIANT_HEADER)
        if body_model and ":" in body_model:
            forced = forced or body_model.split(":", 1)[1]
        if forced:
            if forced not in self.handles:
                raise HTTPError(400, f"unknown variant {forced!r}; configured: {', '.join(sorted(self.handles))}",
                                "invalid_request_error", VARIANT_HEADER)
            return forced, False
        variant, fallback = self.router.choose(user or request.headers.get(USER_HEADER), self._down())
        self.metrics.assignments.inc(1, tags={"variant": variant})
        if fallback:
            self.metrics.fallbacks.inc(1, tags={"variant": variant})
        return variant, fallback

    def _other(self, variant: str) -> str | None:
        others = [v for v in sorted(self.handles) if v != variant and v not in self._down()]
        return others[0] if others else None

    async def _events(self, variant: str, payload: dict):
        """The replica's event stream; replica failures become an `unavailable` event."""
        try:
            generator = self.handles[variant].options(stream=True).stream.remote(payload)
            async for event in generator:
                yield event
        except (RayError, RuntimeError) as err:
            log.warning("variant %s failed: %r", variant, err)
            self.down_until[variant] = time.monotonic() + DOWN_COOLDOWN_S
            yield {"type": "unavailable", "message": f"variant {variant} is unavailable"}

    async def _first_event(self, variant: str, payload: dict, can_fall_back: bool):
        """Start the request; if the variant fails before answering, fail over once."""
        events = self._events(variant, payload)
        first = await asyncio.wait_for(events.__anext__(), self.request_timeout_s)
        if first["type"] == "unavailable" and can_fall_back and (other := self._other(variant)):
            self.metrics.fallbacks.inc(1, tags={"variant": other})
            variant, events = other, self._events(other, payload)
            first = await asyncio.wait_for(events.__anext__(), self.request_timeout_s)
        if first["type"] == "unavailable":
            raise HTTPError(503, first["message"], "unavailable", retry_after=int(DOWN_COOLDOWN_S))
        if first["type"] == "error":
            raise HTTPError(first["status"], first["message"], first["kind"], first["param"], first["retry_after"])
        return variant, first, events

    def _shadow(self, primary: str, payload: dict) -> None:
        shadow = self.router.shadow_of(primary)
        if shadow and shadow not in self._down():
            self.metrics.shadow.inc(1, tags={"variant": shadow})
            self.handles[shadow].generate.remote(payload)  # recorded by the shadow's own metrics

    # ---- endpoints -------------------------------------------------------------------

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._openai(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self._openai(body, request)

    async def _openai(self, body: CompletionRequest | ChatCompletionRequest, request: Request):
        """Both OpenAI endpoints: assign, forward (falling back unless forced), shadow, answer or stream."""
        self._check_auth(request)
        self._check_model(body.model)
        variant, _ = self._assign(request, body.model, body.user)
        payload = _request_to_engine(body)
        forced = VARIANT_HEADER in request.headers or ":" in body.model
        try:
            variant, first, events = await self._first_event(variant, payload, can_fall_back=not forced)
        except HTTPError as err:
            return err.response(variant)
        except asyncio.TimeoutError:
            return HTTPError(504, f"variant {variant} did not answer in {self.request_timeout_s} s", "timeout",
                             retry_after=5).response(variant)
        self._shadow(variant, payload)
        headers = {VARIANT_HEADER: variant}
        if body.stream:
            return StreamingResponse(self._sse(body, first, events), media_type="text/event-stream", headers=headers)
        try:
            output = await self._last(first, events)
        except HTTPError as err:
            return err.response(variant)
        return JSONResponse(_openai_response(body, output), headers=headers)

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request):
        self._check_auth(request)
        self._check_model(body.model)
        variant, _ = self._assign(request, body.model, body.user)
        try:
            variant, first, events = await self._first_event(variant, _request_to_engine(body),
                                                             can_fall_back=VARIANT_HEADER not in request.headers)
        except HTTPError as err:
            return err.response(variant)
        except asyncio.TimeoutError:
            return HTTPError(504, f"variant {variant} did not answer", "timeout", retry_after=5).response(variant)
        try:
            output = await self._last(first, events)
        except HTTPError as err:
            return err.response(variant)
        response = GenerateResponse(
            id=output["request_id"], model=body.model or self.model_name, variant=variant, text=output["text"],
            token_ids=output["token_ids"], finish_reason=output["finish_reason"], usage=_usage(output),
            seed=output["seed"], forward_passes=output["usage"]["forward_passes"], latency_s=output["latency_s"],
            time_to_first_block_s=output["time_to_first_block_s"], queue_s=output["queue_s"])
        return JSONResponse(response.model_dump(), headers={VARIANT_HEADER: variant})

    @app.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request):
        self._check_auth(request)
        return ModelList(data=[ModelCard(id=name) for name in self._model_names()])

    @app.get("/healthz")
    async def healthz(self):
        status = {}
        for variant, handle in sorted(self.handles.items()):
            try:
                info = await asyncio.wait_for(handle.info.remote(), 5.0)
                status[variant] = {"status": "up", "waiting": info["waiting"], "running": info["running"]}
            except (RayError, RuntimeError, asyncio.TimeoutError):
                status[variant] = {"status": "down"}
        healthy = any(v["status"] == "up" for v in status.values())
        return JSONResponse({"status": "ok" if healthy else "down", "variants": status},
                            status_code=200 if healthy else 503)

    # ---- response shapes -------------------------------------------------------------

    @staticmethod
    async def _last(first: dict, events) -> dict:
        """The finished output; a stream that ends otherwise becomes an HTTPError."""
        last = first
        async for event in events:
            last = event
        if last["type"] != "finished":
            status = 503 if last["type"] == "unavailable" else last.get("status", 500)
            raise HTTPError(status, last.get("message") or "the variant stopped answering", last.get("kind", "error"))
        return last["output"]

    async def _sse(self, body: CompletionRequest | ChatCompletionRequest, first: dict, events):
        """OpenAI-style SSE: text chunks, a final chunk with finish_reason, usage if asked, [DONE].
        Chat streams open with the assistant's role and carry `delta`s."""
        chat = isinstance(body, ChatCompletionRequest)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind, created = "chat.completion.chunk" if chat else "text_completion", int(time.time())

        def chunk(text: str, finish: str | None = None, usage: dict | None = None, choices: bool = True,
                  role: bool = False) -> str:
            choice = _stream_choice(body, text, finish)
            if role:
                choice["delta"]["role"] = "assistant"
            data = {"id": cid, "object": kind, "created": created, "model": body.model,
                    "choices": [choice] if choices else [], "usage": usage}
            return f"data: {json.dumps(data)}\n\n"

        if chat:
            yield chunk("", role=True)
        async for event in _prepend(first, events):
            if event["type"] == "finished":
                output = event["output"]
                yield chunk("", output["finish_reason"])
                if body.include_usage:
                    yield chunk("", usage=_usage(output).model_dump(), choices=False)
            elif event["type"] in ("error", "unavailable"):
                yield f"data: {json.dumps({'error': {'message': event.get('message'), 'type': event.get('kind', 'unavailable')}})}\n\n"
            elif event.get("text"):
                yield chunk(event["text"])
        yield "data: [DONE]\n\n"
