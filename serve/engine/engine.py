"""`DLMEngine`: in-process serving of one diffusion LM with step-level continuous batching.

One asyncio task is the scheduler loop. Each iteration it retires cancelled
requests, admits waiting ones, picks a batch, runs ONE forward pass (plus every
row's decoding step) in a single worker thread, so the event loop never blocks,
then streams what got committed and retires what finished. A request's output is
the one `generate()` gives for it alone: every row applies its own policy,
schedule and seeded generator, and padding never changes a row's result.

    engine = DLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8))
    output = await engine.generate(GenerationRequest("Once upon", max_tokens=64))
    async for event in engine.submit(GenerationRequest(...)):
        ...   # "tokens" / "block" events, then "finished" with the output

Everything here must be called from the one event loop the engine first ran in.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from sinkprune.dlm.likelihood import estimate_nll
from sinkprune.dlm.model import DiffusionLM
from serve.engine.config import EngineConfig
from serve.engine.model_runner import ModelRunner
from serve.engine.requests import CANCELLED, ERROR, FINISHED, EngineError, GenerationRequest, RequestError, \
    PreparedRequest, RequestOutput, StreamEvent, longest_token_chars, prepare
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """One scheduler iteration, for metrics and tests (see `DLMEngine.step_listeners`)."""

    iteration: int
    request_ids: list[str]
    query_tokens: int  # positions computed, padding included
    cached_tokens: int  # cached positions attended to (prefix and suffix caches), padding included
    cached_rows: int
    started: float
    duration_s: float
    waiting: int  # after the step
    running: int
    finished: int  # requests this step finished

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)


class RequestStream:
    """Async iterator over one request's events; the last one has type `finished`.
    Cancelling the task that iterates (e.g. a client disconnect) cancels the request;
    a consumer that stops early should call `cancel()`."""

    def __init__(self, request_id: str, on_cancel: Callable[[str], None]):
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._done = False

    def put(self, event: StreamEvent) -> None:
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        if not self._done:
            self._on_cancel(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._done = event.type == FINISHED
        return event


class DLMEngine:
    def __init__(self, model: DiffusionLM, tokenizer=None, config: EngineConfig | None = None):
        """`tokenizer` may be None: prompts are then token ids and outputs have no text."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config)
        self._max_length = min(self.config.max_tokens_per_step, model.config.max_position_embeddings,
                               self.config.max_model_len or model.config.max_position_embeddings)
        self.runner = ModelRunner(model, self.config.max_num_seqs, self._max_length, self.config.cuda_graphs)
        self.runner.warm_up(self.config.capture_block_lengths)  # after the replica swapped its sparse layers
        self.step_listeners: list[Callable[[StepStats], None]] = []
        token_chars = longest_token_chars(tokenizer)
        self._max_prompt_chars = self._max_length * token_chars if token_chars else None
        self._requests: dict[str, tuple[Sequence, RequestStream]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlm-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---- API ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue `request` and return its event stream. Raises at once `RequestError`
        (invalid, naming the field) or `EngineOverloaded` (queue full, with retry_after)."""
        self._bind_loop()
        prepared = self._prepare(request)
        if prepared.request_id in self._requests:
            raise RequestError("request_id", f"{prepared.request_id!r} is already in use")
        config = self.model.config
        seq = Sequence(prepared, config.mask_token_id, config.eos_token_ids, self.model.shift_logits,
                       self.runner.device, self.tokenizer, time.perf_counter())
        self.scheduler.add(seq)
        stream = RequestStream(seq.request_id, self.abort)
        self._requests[seq.request_id] = (seq, stream)
        self._wakeup.set()
        return stream

    def _prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validated, tokenized, defaults resolved: the same for generation and for scoring."""
        return prepare(request, self.tokenizer, self.model.config, self._max_length, self.config.prefix_cache,
                       self.config.dual_cache, self.config.stop_token_ids, self._max_prompt_chars)

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        """The whole result; raises `EngineError` if the request failed inside the engine."""
        stream = self.submit(request)
        async for event in stream:
            if event.type == FINISHED:
                if event.output.finish_reason == ERROR:
                    raise EngineError(event.output.error)
                return event.output
        raise AssertionError("a stream always ends with a finished event")

    async def score(self, request: GenerationRequest, answers: list[dict], samples: int, seed: int) -> list[float]:
        """NLL per token (nats) of each answer (`token_ids`, `finish_reason`) after `request`'s
        prompt, under this model, with the same Monte-Carlo masks for answers of equal length:
        the router's paired quality check. An answer that stopped is scored with the end token
        that stopped it. Runs on the engine's worker thread, between denoising steps."""
        self._bind_loop()
        prepared = self._prepare(request)
        prompt, eos = prepared.prompt_ids, self.model.config.eos_token_ids
        rows = [prompt + list(a["token_ids"]) + (list(eos[:1]) if a["finish_reason"] == "stop" else [])
                for a in answers]
        if any(len(row) == len(prompt) or len(row) > self._max_length for row in rows):
            raise RequestError("answers", "an answer to score is empty or longer than a sequence may be")

        def nll(row: list[int]) -> float:
            sequence = torch.tensor([row], device=self.runner.device)
            return estimate_nll(self.model, sequence, samples, seed, batch_size=samples, scored_from=len(prompt)).mean

        return await self._loop.run_in_executor(self._executor, lambda: [nll(row) for row in rows])

    def abort(self, request_id: str) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one frees its
        slot before the next step. Unknown or finished ids are ignored."""
        entry = self._requests.get(request_id)
        if entry is None:
            return
        seq, _ = entry
        seq.cancelled = True
        if seq in self.scheduler.waiting:
            self._finish(seq, CANCELLED)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def check_health(self) -> None:
        """Raise `EngineError` if the scheduler loop has died (a replica should then be restarted)."""
        if self._task is not None and self._task.done() and not self._task.cancelled() \
                and self._task.exception() is not None:
            raise EngineError(f"engine loop died: {self._task.exception()!r}")

    async def shutdown(self) -> None:
        """Stop the loop; requests still pending finish as cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for seq, _ in list(self._requests.values()):
            self._finish(seq, CANCELLED)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # ---- the loop ------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()  # RuntimeError outside a running loop
        if self._loop is None:
            self._loop, self._wakeup = loop, asyncio.Event()
            self._task = loop.create_task(self._run(), name="dlm-engine-scheduler")
        elif self._loop is not loop:
            raise RuntimeError("this DLMEngine is bound to another event loop")
        if self._task is None or self._task.done():
            raise EngineError("this DLMEngine has been shut down or its loop has failed")

    async def _run(self) -> None:
        """The scheduler loop. Should it ever fail, no request is left waiting forever, and
        the task ends with the exception (see `check_health`)."""
        try:
            await self._serve()
        except Exception as err:
            log.exception("the engine loop failed")
            for seq, _ in list(self._requests.values()):
                self._finish(seq, ERROR, f"engine loop failed: {type(err).__name__}: {err}")
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for seq in [s for s in self.scheduler.running if s.cancelled]:
                self._finish(seq, CANCELLED)
            iteration = self.scheduler.iteration
            batch = self.scheduler.schedule(time.perf_counter())
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                result = await loop.run_in_executor(self._executor, self.runner.step, batch,
                                                    self.scheduler.take_moves())
            except Exception as err:  # a failed pass fails its requests, not the engine
                for seq in batch:
                    self._finish(seq, ERROR, f"{type(err).__name__}: {err}")
                continue
            finished = 0
            for seq, events in zip(batch, result.events):
                if seq.cancelled:
                    self._finish(seq, CANCELLED)
                    continue
                _, stream = self._requests[seq.request_id]
                for event in events:
                    stream.put(event)
                if seq.finished:
                    self._finish(seq)
                    finished += 1
            stats = StepStats(iteration, [s.request_id for s in batch], result.query_tokens, result.cached_tokens,
                              result.cached_rows, result.started, result.finished - result.started,
                              self.num_waiting, self.num_running, finished)
            for listener in self.step_listeners:
                try:
                    listener(stats)
                except Exception:  # a broken metrics hook must not stop serving
                    log.exception("step listener %r failed", listener)

    def _finish(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> None:
        """Retire `seq` (with `reason` if it did not finish by itself) and send its last event."""
        if reason is not None:
            seq.abort(reason, error)
        now = time.perf_counter()
        self.scheduler.remove(seq, now)
        _, stream = self._requests.pop(seq.request_id)
        stream.put(StreamEvent(FINISHED, seq.request_id, now, output=seq.output(now)))
