"""`ABRouter`: the HTTP ingress (FastAPI). It validates requests, assigns each to a
variant (weighted, sticky per user, or forced by the `x-dlm-variant` header or a
`sinkserve:<variant>` model name, on every endpoint), forwards it to that variant's
`ModelReplica`, and answers in OpenAI's completions or chat completions format (SSE
when streaming). Every response names the variant that served it.

Trust rules it keeps (docs/SERVING.md):
- one request's failure is that request's: a refusal or a bug answers that request
  alone; only a failed health probe marks a variant down (`VariantHealth`);
- a request whose replica died before it produced anything the client has seen is
  sent once more: to a live replica of its variant, else (unless forced) the other;
- every outcome is counted per variant, here, where it survives a replica's death.

It also decides (docs/ROLLOUT.md): sampled requests get a paired quality check
(`serve.quality`), a live cost per million output tokens is exported per variant
(`serve.cost`), and a canary policy moves the pruned variant's share of traffic up
or back to zero on those numbers (`serve.canary`). All of it is `user_config`.

(No `from __future__ import annotations` here: FastAPI must see the real body
types of the endpoints, which Serve's class-based ingress does not resolve.)
"""

import asyncio
import json
import logging
import os
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve import api_errors, openapi
from serve.api_errors import VARIANT_HEADER, APIError, outcome_of, request_outcome
from serve.canary import CanaryController
from serve.canary_store import GcsStore
from serve.cost import TokenRate, cost_per_million, replica_hour_price
from serve.guards import (
    API_KEY_ENV,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_READING_REQUESTS,
    RequestGuard,
)
from serve.metrics import RouterMetrics
from serve.quality import PairResult, QualityChecker
from serve.router_config import RouterSettings
from serve.routing import Router, RoutingConfig
from serve.schemas import (
    MAX_TOKENS_LIMIT,
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
    RolloutStatus,
    Usage,
)
from serve.variant_health import VariantHealth

log = logging.getLogger("ray.serve")
USER_HEADER = "x-user-id"

app = FastAPI(title="sinkserve", description="Dense and pruned diffusion LMs behind one A/B endpoint.")
app.add_middleware(RequestGuard)
api_errors.install(app)


class ReplicaGone(Exception):
    """The replica serving a request died or is stopping: the request may be sent again."""


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


def _generate_response(body: GenerateRequest, model_name: str, variant: str, output: dict) -> dict:
    return GenerateResponse(
        id=output["request_id"], model=body.model or model_name, variant=variant, text=output["text"],
        token_ids=output["token_ids"], finish_reason=output["finish_reason"], usage=_usage(output),
        seed=output["seed"], forward_passes=output["usage"]["forward_passes"], latency_s=output["latency_s"],
        time_to_first_block_s=output["time_to_first_block_s"], queue_s=output["queue_s"]).model_dump()


def _raise_if_error(event: dict) -> dict:
    """A replica's refusal or failure of this request, as the APIError the client gets."""
    if event["type"] == "error":
        raise APIError(event["status"], event["message"], event["kind"], event["param"], event["retry_after"])
    return event


async def _first(events) -> dict:
    return _raise_if_error(await events.__anext__())


async def _last(events) -> dict:
    last = None
    async for event in events:
        last = _raise_if_error(event)
    if last is None or last["type"] != "finished":
        raise ReplicaGone("the replica's stream ended without a result")
    return last["output"]


def _sse_error(message: str, kind: str) -> str:
    return f"data: {json.dumps(api_errors.error_body(message, kind))}\n\n"


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class ABRouter:
    def __init__(self, variants: dict[str, DeploymentHandle], model_name: str = "sinkserve",
                 routing: dict | None = None, request_timeout_s: float = 300.0, max_tokens: int = MAX_TOKENS_LIMIT,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, probe_timeout_s: float = 5.0,
                 max_concurrent_requests: int = 512, variant_specs: dict[str, dict] | None = None,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 max_reading_requests: int = DEFAULT_MAX_READING_REQUESTS, max_sequence: int | None = None):
        """`variant_specs`: each variant's model, device and replica count (cost, and what
        identifies a canary rollout). `max_tokens` is what a request may ask, already within
        `max_sequence` (the shortest sequence of the variants' models, prompt included; None
        when it could not be read), which the OpenAPI document and refusals state."""
        self.handles = variants
        self.variant_specs = variant_specs or {v: {"model": v, "device": "cpu", "num_replicas": 1} for v in variants}
        self.model_name = model_name
        self.request_timeout_s = request_timeout_s
        self.max_tokens = max_tokens
        self.max_sequence = max_sequence
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0  # generation requests this router holds (streams until they end)
        self.metrics = RouterMetrics()
        self.health = VariantHealth(lambda v: self.handles[v].info.remote(), sorted(variants), probe_timeout_s,
                                    on_down=lambda v: self.metrics.variant_down.inc(1, tags={"variant": v}))
        app.state.max_body_bytes = max_body_bytes
        app.state.body_timeout_s = body_timeout_s
        app.state.max_reading_requests = max_reading_requests
        app.state.reading_requests = 0
        app.state.count_refusal = lambda status: self.metrics.outcome(None, outcome_of(status))
        self._openapi: dict | None = None
        app.openapi = self._openapi_schema
        self.quality = QualityChecker(variants, self._on_pair)
        self.canary: CanaryController | None = None
        self.canary_store, self.leader = GcsStore(), True
        self.tokens = TokenRate(60.0, time.monotonic())
        self._ticker: asyncio.Task | None = None
        self._configure(RouterSettings.model_validate(routing or {}))

    async def reconfigure(self, user_config: dict, rank=None) -> None:
        """Live changes from `serve deploy` (`user_config`, `serve.router_config.RouterSettings`):
        routing, quality checks, prices, the canary. Router replica 0 leads the canary."""
        self.leader = rank is None or rank.rank == 0
        self._configure(RouterSettings.model_validate(user_config or {}))
        if self.canary is not None:
            self.canary.leader = self.leader
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(), name="router-ticker")

    def _configure(self, settings: RouterSettings) -> None:
        settings.check_variants(sorted(self.handles))
        self.settings = settings
        self.tokens.window_s = settings.cost.window_s
        key = f"canary:{self._app_name()}"
        if settings.canary is None:
            if self.canary is not None and self.leader:
                self.canary_store.delete(key)  # a manual deploy without a canary ends the rollout
            self.canary = None
        elif self.canary is None or self.canary.policy != settings.canary:
            models = {v: spec["model"] for v, spec in self.variant_specs.items()}
            self.canary = CanaryController(settings.canary, models, self.canary_store, key, self.leader, time.time())
            log.info("canary %s: %s at %.0f%%", "resumed" if self.canary.resumed else "started",
                     settings.canary.variant, 100 * self.canary.weight)
        self._route()
        self.quality.configure(settings.quality, settings.quality_rate(),
                               settings.canary.variant if settings.canary else None)

    def _route(self) -> None:
        weights = self.canary.weights() if self.canary else self.settings.weights
        weights = {**{v: 0.0 for v in self.handles}, **weights} if weights else {v: 1.0 for v in self.handles}
        self.router = Router(RoutingConfig(weights, self.settings.sticky, self.settings.salt))
        log.info("routing: %s", self.router.config)

    @staticmethod
    def _app_name() -> str:
        try:
            return serve.get_replica_context().app_name
        except Exception:  # outside a Serve replica (a test building the router directly)
            return "default"

    def _openapi_schema(self) -> dict:
        if self._openapi is None:
            self._openapi = openapi.build(app, self._model_names(), self.max_tokens,
                                          auth=bool(os.environ.get(API_KEY_ENV)), max_sequence=self.max_sequence)
        return self._openapi

    # ---- assignment ------------------------------------------------------------------

    def _model_names(self) -> list[str]:
        return [self.model_name] + [f"{self.model_name}:{v}" for v in sorted(self.handles)]

    def _check(self, body) -> None:
        if body.model is not None and body.model not in self._model_names():
            raise APIError(404, f"model {body.model!r} does not exist; available: {', '.join(self._model_names())}",
                           param="model")
        if "max_tokens" not in body.model_fields_set:  # the default may not exceed this deployment's limit
            body.max_tokens = min(body.max_tokens, self.max_tokens)
        if body.max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens: {openapi.max_tokens_rule(self.max_tokens, self.max_sequence)}, "
                                f"got {body.max_tokens}", param="max_tokens")

    def _forced(self, request: Request, body) -> str | None:
        """The variant a request names (header, or a `sinkserve:<variant>` model); same on every endpoint."""
        forced = request.headers.get(VARIANT_HEADER)
        if not forced and body.model and ":" in body.model:
            forced = body.model.split(":", 1)[1]
        if forced is not None and forced not in self.handles:
            raise APIError(400, f"unknown variant {forced!r}; configured: {', '.join(sorted(self.handles))}",
                           param=VARIANT_HEADER)
        return forced

    def _assign(self, request: Request, body, forced: str | None) -> str:
        if forced:
            return forced
        variant, fallback = self.router.choose(body.user or request.headers.get(USER_HEADER), self.health.down)
        self.metrics.assignments.inc(1, tags={"variant": variant})
        if fallback:
            self.metrics.fallbacks.inc(1, tags={"variant": variant})
        return variant

    def _other(self, variant: str) -> str | None:
        others = [v for v in sorted(self.handles) if v != variant and v not in self.health.down]
        return others[0] if others else None

    # ---- talking to replicas ---------------------------------------------------------

    async def _events(self, variant: str, payload: dict):
        """The replica's event stream. A dead or stopping replica raises ReplicaGone; anything
        else that goes wrong is an error event of this request alone."""
        try:
            generator = self.handles[variant].options(stream=True).stream.remote(payload)
            async for event in generator:
                if event["type"] == "error" and event["status"] == 503:
                    raise ReplicaGone(event["message"])
                yield event
        except RayTaskError as err:  # the replica's code raised for this request: not a dead replica
            log.error("variant %s failed a request: %r", variant, err)
            yield {"type": "error", "status": 500, "message": f"variant {variant} failed this request",
                   "kind": "server_error", "param": None, "retry_after": None}
        except BackPressureError as err:
            yield {"type": "error", "status": 429, "message": f"variant {variant} is overloaded: {err}",
                   "kind": "overloaded", "param": None, "retry_after": 1}
        except RayError as err:  # the replica process died or cannot be reached
            raise ReplicaGone(f"{type(err).__name__}") from err

    async def _failover(self, variant: str, forced: bool) -> str:
        """Where a request goes after its replica died: a live replica of the same variant if
        its health probe answers, else (unless forced) another variant."""
        if await self.health.check(variant):
            self.metrics.retries.inc(1, tags={"variant": variant})
            return variant
        if not forced and (other := self._other(variant)):
            self.metrics.fallbacks.inc(1, tags={"variant": other})
            return other
        raise APIError(503, f"variant {variant} is unavailable (no live replica)")

    async def _run(self, variant: str, payload: dict, forced: bool, consume):
        """`consume(events)` against `variant`, sent once more if its replica dies first."""
        for attempt in range(2):
            events = self._events(variant, payload)
            try:
                return variant, await consume(events), events
            except APIError:
                await events.aclose()
                raise
            except ReplicaGone as gone:
                await events.aclose()
                log.warning("variant %s: replica gone during a request (%s)", variant, gone)
                if attempt:
                    raise APIError(503, f"variant {variant} is unavailable ({gone})") from None
                variant = await self._failover(variant, forced)
        raise AssertionError("unreachable")

    # ---- endpoints -------------------------------------------------------------------

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self._serve(body, request)

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request):
        return await self._serve(body, request)

    async def _serve(self, body, request: Request):
        """Every generation endpoint: check, assign, run (with one failover), answer or stream;
        every outcome counted once for the variant that answered."""
        request_outcome(request.scope).take_over()  # counted here from now on, not by the guard
        variant, streaming, started = None, False, time.monotonic()
        if self.in_flight >= self.max_concurrent_requests:  # refused here, in the error shape, with Retry-After
            self.metrics.outcome(None, "overloaded")
            return APIError(429, f"the router holds {self.in_flight} requests, its limit; retry shortly",
                            "overloaded", retry_after=1).response()
        self.in_flight += 1
        try:
            self._check(body)
            forced = self._forced(request, body)
            variant = self._assign(request, body, forced)
            payload = _request_to_engine(body)
            if getattr(body, "stream", False):
                variant, first, events = await asyncio.wait_for(
                    self._run(variant, payload, bool(forced), _first), self.request_timeout_s)
                # what the stream sets as it goes (cancelled if the client leaves), and its output
                end = {"outcome": "cancelled", "started": started, "payload": payload}
                stream = self._sse(body, variant, first, events, end)
                # counted and its slot released once: when the stream ends, or when it is dropped unstarted
                end["finish"] = weakref.finalize(stream, self._stream_finished, variant, end)
                streaming = True
                return StreamingResponse(stream, media_type="text/event-stream", headers={VARIANT_HEADER: variant})
            variant, output, _ = await asyncio.wait_for(self._run(variant, payload, bool(forced), _last),
                                                        self.request_timeout_s)
            answer = _generate_response(body, self.model_name, variant, output) \
                if isinstance(body, GenerateRequest) else _openai_response(body, output)
            self._count(variant, "ok", started, output)
            self.quality.maybe_check(variant, payload, output)
            return JSONResponse(answer, headers={VARIANT_HEADER: variant})
        except APIError as err:
            self._count(variant, outcome_of(err.status), started)
            return err.response(variant)
        except asyncio.TimeoutError:
            self._count(variant, "timeout", started)
            return APIError(504, f"variant {variant} did not answer in {self.request_timeout_s} s").response(variant)
        except asyncio.CancelledError:  # the client went away
            self._count(variant, "cancelled", started)
            raise
        except Exception as err:  # a bug here: this request's 500, counted
            log.exception("router failed a request")
            self._count(variant, "error", started)
            return APIError(500, f"internal error: {type(err).__name__}").response(variant)
        finally:
            if not streaming:
                self._release_slot()

    def _release_slot(self) -> None:
        self.in_flight -= 1

    def _stream_finished(self, variant: str, end: dict) -> None:
        self._release_slot()
        self._count(variant, end["outcome"], end["started"], end.get("output"))

    def _count(self, variant: str | None, status: str, started: float, output: dict | None = None) -> None:
        """One user request's outcome: Prometheus, the canary's evidence and the cost's tokens."""
        self.metrics.outcome(variant, status)
        if variant is None:
            return
        if self.canary is not None:
            self.canary.record_outcome(variant, status, time.monotonic() - started if status == "ok" else None)
        if output is not None:
            self.tokens.add(variant, output["usage"]["completion_tokens"], time.monotonic())

    def _on_pair(self, result: PairResult) -> None:
        self.metrics.quality_pair(result.candidate, result.outcome, result.gap, result.agreement)
        if result.copied_to:
            self.metrics.shadow.inc(1, tags={"variant": result.copied_to})
        if self.canary is not None and result.agreement is not None:
            self.canary.record_pair(result.candidate, result.gap, result.agreement)

    # ---- the periodic work: live cost and the canary ------------------------------

    async def _tick_forever(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # never let a bug here stop the loop (or touch a request)
                log.exception("router tick failed")
            await asyncio.sleep(self.settings.tick_s)

    def _live_cost(self) -> dict[str, float]:
        now, prices = time.monotonic(), self.settings.cost
        costs = {}
        for variant, spec in self.variant_specs.items():
            hourly = replica_hour_price(spec["device"], prices.cpu_replica_hour, prices.gpu_replica_hour)
            cost = cost_per_million(self.tokens.rate(variant, now), hourly * spec["num_replicas"])
            if cost is not None and hourly > 0:
                costs[variant] = cost
        return costs

    def _tick(self) -> None:
        costs = self._live_cost()
        for variant, cost in costs.items():  # a variant that served nothing has no cost per token: no sample
            self.metrics.cost.set(cost, tags={"variant": variant})
        if self.canary is None:
            return
        policy = self.canary.policy
        ratio = costs[policy.variant] / costs[policy.baseline] \
            if policy.variant in costs and policy.baseline in costs else None
        weight = self.canary.weight
        decision = self.canary.tick(time.time(), ratio)
        if decision is not None:
            log.warning("%s", decision.describe())
            self.metrics.canary_decisions.inc(1, tags={"variant": policy.variant, "decision": decision.decision,
                                                       "reason": decision.reason})
        if decision is not None or self.canary.weight != weight:
            self._route()
        self.metrics.canary_weight.set(self.canary.weight, tags={"variant": policy.variant})

    async def load(self) -> dict:
        """What this router replica holds now (a handle call, not HTTP): generation requests,
        requests still sending their bodies, and the asyncio tasks of its event loop."""
        return {"in_flight": self.in_flight, "reading": app.state.reading_requests,
                "tasks": len(asyncio.all_tasks())}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self):
        return ModelList(data=[ModelCard(id=name) for name in self._model_names()])

    @app.get("/rollout", response_model=RolloutStatus)
    async def rollout(self):
        """The live decision: weights, quality checks, the canary's state and recent decisions."""
        quality = {"sample_rate": self.quality.rate, "reference": self.settings.quality.reference,
                   "candidate": self.quality.candidate}
        return RolloutStatus(weights=self.router.config.weights, quality=quality,
                             canary=self.canary.status() if self.canary else None)

    @app.get("/healthz")
    async def healthz(self):
        """Probes every variant (and updates which are down); 200 while any can serve."""
        infos = await asyncio.gather(*(self.health.check(v) for v in sorted(self.handles)))
        status = {variant: {"status": "up", "waiting": info["waiting"], "running": info["running"]} if info
                  else {"status": "down"} for variant, info in zip(sorted(self.handles), infos)}
        healthy = any(infos)
        headers = {} if healthy else {"Retry-After": "5"}
        return JSONResponse({"status": "ok" if healthy else "down", "variants": status},
                            status_code=200 if healthy else 503, headers=headers)

    # ---- streaming -------------------------------------------------------------------

    async def _sse(self, body: CompletionRequest | ChatCompletionRequest, variant: str, first: dict, events,
                   end: dict):
        """OpenAI-style SSE: text chunks, a final chunk with finish_reason, usage if asked, [DONE].
        Chat streams open with the assistant's role and carry `delta`s. Its outcome (and output)
        go in `end`, counted by `end["finish"]()` when it ends (`cancelled` if the client left)."""
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

        try:
            if chat:
                yield chunk("", role=True)
            try:
                async for event in _prepend(first, events):
                    if event["type"] == "finished":
                        output = event["output"]
                        yield chunk("", output["finish_reason"])
                        if body.include_usage:
                            yield chunk("", usage=_usage(output).model_dump(), choices=False)
                        end["outcome"], end["output"] = "ok", output
                        self.quality.maybe_check(variant, end["payload"], output)
                    elif event["type"] == "error":
                        end["outcome"] = outcome_of(event["status"])
                        yield _sse_error(event["message"], event["kind"])
                    elif event.get("text"):
                        yield chunk(event["text"])
            except ReplicaGone as gone:  # the client has seen part of the answer: it cannot be sent again
                end["outcome"] = "unavailable"
                yield _sse_error(f"variant {variant} stopped answering ({gone})", "unavailable")
            yield "data: [DONE]\n\n"
        finally:
            end["finish"]()
