"""`ModelReplica`: one variant (a model directory or a pruned artifact) behind one DLMEngine.

A 2:4 artifact's layers are loaded packed, never dense (`load_model(..., packed=True)`), and the
model is prepared as `serve.engine.prepare` says: q/k/v and gate/up fused, then each 2:4 layer
becomes a `Sparse24Linear` where the dispatch measured on this device gives it a sparse backend,
holding only that backend's form, and an `nn.Linear` (unpacked) where dense wins, as on a CPU:
the same product, the weight held once. Results cross the Ray boundary as
plain dicts; refusals (bad input, overload) and failures of one request (a bug
while preparing or running it) are returned as error events with the HTTP status
the router should answer, never raised: an exception escaping a replica call would
look to the router like a dead replica. Outcomes are counted by the router.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import AsyncIterator

from ray import serve

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine, StepStats
from serve.engine.prepare import prepare_for_serving
from serve.metrics import ReplicaMetrics
from serve.engine.requests import FINISHED, EngineOverloaded, GenerationRequest, RequestError, RequestOutput

log = logging.getLogger("ray.serve")


def error_event(status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None) -> dict:
    return {"type": "error", "status": status, "message": message, "kind": kind, "param": param,
            "retry_after": retry_after}


def output_dict(output: RequestOutput) -> dict:
    data = dataclasses.asdict(output)
    data.update(latency_s=output.latency_s, queue_s=output.queue_s,
                time_to_first_block_s=output.time_to_first_block_s)
    return data


@serve.deployment(max_ongoing_requests=128, graceful_shutdown_timeout_s=5)
class ModelReplica:
    def __init__(self, variant: str, model: str, device: str = "cpu", dtype: str | None = None,
                 engine: dict | None = None, sparse_backend: str | None = None):
        import torch

        from sinkprune.dlm.artifact_io import verify_manifest
        from sinkprune.dlm.loading import load_model, resolve_model_dir

        self.variant = variant
        self.model_path = model
        loaded, tokenizer = load_model(model, device=device, dtype=getattr(torch, dtype) if dtype else None,
                                       packed=True)
        self.manifest = verify_manifest(resolve_model_dir(model)) or {}
        config = EngineConfig(**(engine or {}))
        self.prepared = prepare_for_serving(loaded, config, self._is_24(loaded), sparse_backend)
        if self.prepared.dispatch is not None:
            table = self.prepared.dispatch
            log.info("sparse dispatch (%s, measured now: %d shapes in %.1f s): %s", table.path,
                     len(table.measured), table.seconds, table.plans)
        self.engine = DLMEngine(loaded, tokenizer, config)
        self.metrics = ReplicaMetrics(variant)
        self.engine.step_listeners.append(self._on_step)
        log.info("variant %s: %s on %s, %d fused projections, %d sparse layers", variant, model, device,
                 len(self.prepared.fused), len(self.prepared.swapped))

    @staticmethod
    def _is_24(model) -> bool:
        from sinkprune.dlm.artifact_io import sparsity_format

        return sparsity_format(model.config.hf_config) is not None

    def _on_step(self, stats: StepStats) -> None:
        self.metrics.step_finished(stats.batch_size, stats.duration_s, stats.waiting, stats.running,
                                   stats.query_tokens)

    async def stream(self, request: dict, record: bool = True) -> AsyncIterator[dict]:
        """Events of one request: `tokens` chunks, then `finished` with the output (or one `error`).
        `record=False` (a quality-check copy) leaves it out of the user request metrics."""
        try:
            events = self.engine.submit(GenerationRequest(**request))
        except RequestError as err:
            yield error_event(400, str(err), "invalid_request_error", err.field)
            return
        except EngineOverloaded as err:
            yield error_event(429, str(err), "overloaded", retry_after=err.retry_after)
            return
        except Exception as err:  # a bug preparing this one request: answered for it alone
            log.exception("variant %s: could not prepare a request", self.variant)
            yield error_event(500, f"could not prepare the request: {type(err).__name__}", "server_error")
            return
        try:
            async for event in self._events(events, record):
                yield event
        except Exception as err:  # a bug must reach the client as a 500, not kill the stream silently
            log.exception("variant %s: request failed", self.variant)
            yield error_event(500, f"generation failed: {type(err).__name__}", "server_error")

    async def _events(self, events, record: bool) -> AsyncIterator[dict]:
        async for event in events:
            if event.type == FINISHED:
                output = event.output
                self.metrics.waiting.set(self.engine.num_waiting, tags=self.metrics.tags)
                self.metrics.running.set(self.engine.num_running, tags=self.metrics.tags)
                if output.finish_reason == "error":
                    yield error_event(500, f"generation failed: {output.error}", "server_error")
                elif output.finish_reason == "cancelled":  # not by its consumer: the replica is stopping
                    yield error_event(503, "the replica stopped before finishing the request", "unavailable",
                                      retry_after=1)
                else:
                    if record:
                        self.metrics.request_finished(output)
                    yield {"type": FINISHED, "output": output_dict(output)}
            elif event.text or event.token_ids:
                yield {"type": event.type, "text": event.text, "token_ids": event.token_ids, "block": event.block}

    def _busier_than(self, max_busy: int) -> bool:
        return self.engine.num_waiting + self.engine.num_running > max_busy

    async def shadow(self, request: dict, max_busy: int) -> dict:
        """A quality check's copy of a user request: refused (`dropped`) rather than queued
        when this replica holds more than `max_busy` requests; not counted as user traffic."""
        if self._busier_than(max_busy):
            return {"type": "dropped", "reason": "busy"}
        last = None
        async for event in self.stream(request, record=False):
            last = event
        return last

    async def score(self, request: dict, answers: list[dict], samples: int, seed: int, max_busy: int) -> dict:
        """This model's NLL per token of each answer to `request` (see `DLMEngine.score`)."""
        if self._busier_than(max_busy):
            return {"type": "dropped", "reason": "busy"}
        try:
            return {"type": "scored", "nll": await self.engine.score(GenerationRequest(**request), answers, samples,
                                                                    seed)}
        except RequestError as err:
            return error_event(400, str(err), "invalid_request_error", err.field)
        except Exception as err:  # a bug scoring: this check fails, nothing else
            log.exception("variant %s: could not score answers", self.variant)
            return error_event(500, f"scoring failed: {type(err).__name__}", "server_error")

    def info(self) -> dict:
        return {"variant": self.variant, "model": self.model_path, **self.prepared.summary(),
                "runner": self.engine.runner.stats(),
                "manifest": {k: v for k, v in self.manifest.items() if k not in ("files", "per_layer_sparsity")},
                "waiting": self.engine.num_waiting, "running": self.engine.num_running}

    def check_health(self) -> None:
        """Serve's health check: a dead engine loop makes the replica unhealthy (and restarted)."""
        self.engine.check_health()
