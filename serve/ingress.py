"""`ABRouter`: the HTTP ingress (a Ray Serve deployment over FastAPI). It only translates: an
HTTP request becomes calls on `serve.decisions.Decisions` (which variant, where to fail over,
what to record) and on the chosen variant's `ModelReplica`; the answer is shaped by `serve.api`
(OpenAI's completions or chat completions, SSE when streaming). Every response names the
variant that served it.

Trust rules it keeps (docs/SERVING.md):
- one request's failure is that request's: a refusal or a bug answers that request
  alone; only a failed health probe marks a variant down (`VariantHealth`);
- a request whose replica died before it produced anything the client has seen is
  sent once more: to a live replica of its variant, else (unless forced) the other;
- every outcome is counted per variant, here, where it survives a replica's death.

(No `from __future__ import annotations` here: FastAPI must see the real body
types of the endpoints, which Serve's class-based ingress does not resolve.)
"""

import asyncio
import functools
import logging
import os
import time
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.api import admission, api_errors, openapi, streaming
from serve.api.api_errors import VARIANT_HEADER, APIError, outcome_of, request_outcome
from serve.api.guards import (
    API_KEY_ENV,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_READING_REQUESTS,
    RequestGuard,
)
from serve.api.responses import generate_response, openai_response, request_to_engine
from serve.api.schemas import (
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    RolloutStatus,
)
from serve.api.streaming import ReplicaGone
from serve.canary_store import GcsStore
from serve.decisions import Decisions
from serve.decisions.router_config import RouterSettings
from serve.metrics import RouterMetrics

log = logging.getLogger("ray.serve")
USER_HEADER = "x-user-id"

app = FastAPI(title="sinkserve", description="Dense and pruned diffusion LMs behind one A/B endpoint.")
app.add_middleware(RequestGuard)
api_errors.install(app)


# Module-level helpers stay above the deployment class: Serve pickles the ingress class
# with the globals it sees at decoration time.
class ServeReplicas:
    """The variants' `ModelReplica` handles, as `Decisions` calls them (`serve.decisions.Replicas`)."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    def info(self, variant: str):
        return self.handles[variant].info.remote()

    def shadow(self, variant: str, payload: dict, max_busy: int):
        return self.handles[variant].shadow.remote(payload, max_busy)

    def score(self, variant: str, payload: dict, answers: list[dict], samples: int, seed: int, max_busy: int):
        return self.handles[variant].score.remote(payload, answers, samples, seed, max_busy)


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a Serve replica (a test building the router directly)
        return "default"


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
        self.model_name = model_name
        self.request_timeout_s = request_timeout_s
        self.max_tokens = max_tokens
        self.max_sequence = max_sequence
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0  # generation requests this router holds (streams until they end)
        specs = variant_specs or {v: {"model": v, "device": "cpu", "num_replicas": 1} for v in variants}
        self.decisions = Decisions(specs, ServeReplicas(variants), RouterMetrics(), GcsStore(),
                                   f"canary:{_app_name()}", probe_timeout_s,
                                   RouterSettings.model_validate(routing or {}))
        app.state.max_body_bytes = max_body_bytes
        app.state.body_timeout_s = body_timeout_s
        app.state.max_reading_requests = max_reading_requests
        app.state.reading_requests = 0
        app.state.count_refusal = lambda status: self.decisions.record(None, outcome_of(status), time.monotonic())
        self._openapi: dict | None = None
        app.openapi = self._openapi_schema
        self._ticker: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict, rank=None) -> None:
        """Live changes from `serve deploy` (`user_config`, `serve.decisions.router_config.RouterSettings`):
        routing, quality checks, prices, the canary. Router replica 0 leads the canary."""
        self.decisions.configure(RouterSettings.model_validate(user_config or {}),
                                 leader=rank is None or rank.rank == 0)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self.decisions.tick_forever(),
                                                                  name="router-ticker")

    def _openapi_schema(self) -> dict:
        if self._openapi is None:
            self._openapi = openapi.build(app, self._model_names(), self.max_tokens,
                                          auth=bool(os.environ.get(API_KEY_ENV)), max_sequence=self.max_sequence)
        return self._openapi

    def _model_names(self) -> list[str]:
        return admission.model_names(self.model_name, list(self.handles))

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

    async def _run(self, variant: str, payload: dict, forced: bool, consume):
        """`consume(events)` against `variant`, sent once more (where `Decisions.failover` says)
        if its replica dies first."""
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
                failed, variant = variant, await self.decisions.failover(variant, forced)
                if variant is None:
                    raise APIError(503, f"variant {failed} is unavailable (no live replica)")
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
        variant, streamed, started = None, False, time.monotonic()
        if self.in_flight >= self.max_concurrent_requests:  # refused here, in the error shape, with Retry-After
            self.decisions.record(None, "overloaded", started)
            return APIError(429, f"the router holds {self.in_flight} requests, its limit; retry shortly",
                            "overloaded", retry_after=1).response()
        self.in_flight += 1
        try:
            admission.check(body, self._model_names(), self.max_tokens, self.max_sequence)
            forced = admission.forced_variant(request.headers, body, list(self.handles))
            variant = forced or self.decisions.choose(body.user or request.headers.get(USER_HEADER))
            payload = request_to_engine(body)
            if getattr(body, "stream", False):
                variant, first, events = await asyncio.wait_for(
                    self._run(variant, payload, bool(forced), streaming.first), self.request_timeout_s)
                # what the stream sets as it goes (cancelled if the client leaves), and its output
                end = {"outcome": "cancelled", "started": started}
                answered = functools.partial(self.decisions.answered, variant, payload)
                stream = streaming.sse(body, variant, first, events, end, answered)
                # counted and its slot released once: when the stream ends, or when it is dropped unstarted
                end["finish"] = weakref.finalize(stream, self._stream_finished, variant, end)
                streamed = True
                return StreamingResponse(stream, media_type="text/event-stream", headers={VARIANT_HEADER: variant})
            variant, output, _ = await asyncio.wait_for(self._run(variant, payload, bool(forced), streaming.last),
                                                        self.request_timeout_s)
            answer = generate_response(body, self.model_name, variant, output) \
                if isinstance(body, GenerateRequest) else openai_response(body, output)
            self.decisions.record(variant, "ok", started, output)
            self.decisions.answered(variant, payload, output)
            return JSONResponse(answer, headers={VARIANT_HEADER: variant})
        except APIError as err:
            self.decisions.record(variant, outcome_of(err.status), started)
            return err.response(variant)
        except asyncio.TimeoutError:
            self.decisions.record(variant, "timeout", started)
            return APIError(504, f"variant {variant} did not answer in {self.request_timeout_s} s").response(variant)
        except asyncio.CancelledError:  # the client went away
            self.decisions.record(variant, "cancelled", started)
            raise
        except Exception as err:  # a bug here: this request's 500, counted
            log.exception("router failed a request")
            self.decisions.record(variant, "error", started)
            return APIError(500, f"internal error: {type(err).__name__}").response(variant)
        finally:
            if not streamed:
                self._release_slot()

    def _release_slot(self) -> None:
        self.in_flight -= 1

    def _stream_finished(self, variant: str, end: dict) -> None:
        self._release_slot()
        self.decisions.record(variant, end["outcome"], end["started"], end.get("output"))

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
        return RolloutStatus(**self.decisions.status())

    @app.get("/healthz")
    async def healthz(self):
        """Probes every variant (and updates which are down); 200 while any can serve."""
        infos = await self.decisions.probe()
        status = {variant: {"status": "up", "waiting": info["waiting"], "running": info["running"]} if info
                  else {"status": "down"} for variant, info in infos.items()}
        healthy = any(infos.values())
        headers = {} if healthy else {"Retry-After": "5"}
        return JSONResponse({"status": "ok" if healthy else "down", "variants": status},
                            status_code=200 if healthy else 503, headers=headers)
