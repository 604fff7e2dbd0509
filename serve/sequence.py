"""One request's denoising state, advanced one step at a time by the engine.

A sequence is `prompt + [MASK] * max_tokens`, decoded block by block exactly as
`sinkprune.dlm.generate.generate` decodes that request alone: the same schedule,
the same `denoise_step`, its own seeded generator. What the engine adds is
bookkeeping: the prefix (and dual) cache of the current block, which committed tokens are
new (for streaming), when the request is done (EOS, a stop token id, a stop
string, or no mask left), and usage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkprune.dlm.decoding import llada_transfer_counts
from sinkprune.dlm.generate import DenoiseParams, block_done, denoise_step, prefix_cut
from sinkprune.dlm.model import KVCache
from serve.detokenizer import IncrementalText
from serve.requests import BLOCK, LENGTH, STOP, TOKENS, PreparedRequest, RequestOutput, \
    StreamEvent, Usage


@dataclass
class PassPlan:
    """What one sequence contributes to the next forward pass."""

    token_ids: list[int]  # the positions to compute: the whole sequence, or a span from `offset` on
    offset: int  # where `token_ids` start in the sequence
    prefix: KVCache | None  # cached keys/values of the positions before `offset`
    suffix: KVCache | None  # cached keys/values of the positions after the span (dual cache)
    keep: int | None  # after this pass, cache the keys/values of its first `keep` positions
    keep_suffix: int | None  # ... and of its positions from `keep_suffix` on (dual cache)


class Sequence:
    def __init__(self, request: PreparedRequest, mask_id: int, eos_ids: tuple[int, ...], shift_logits: bool,
                 device: torch.device, tokenizer, arrival_time: float):
        self.request = request
        self.request_id = request.request_id
        self.prompt_length = len(request.prompt_ids)
        # what ends the completion: EOS (unless ignored) and the request's stop token ids
        self.end_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else set(eos_ids))
        self.shift_logits = shift_logits
        self.params = DenoiseParams(request.remasking, request.temperature, request.threshold,
                                    request.steps // (request.max_tokens // request.block_length), mask_id)
        self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.x = torch.tensor([request.prompt_ids + [mask_id] * request.max_tokens], dtype=torch.long, device=device)
        self.text = IncrementalText(tokenizer, request.stop)
        self.block = self.step = 0
        self.schedule = self._block_schedule()
        self.cache: KVCache | None = None  # the current block's prefix cache, once its first pass ran
        self.suffix: KVCache | None = None  # ... and its suffix cache (dual cache)
        self.committed: list[int] = []  # the contiguous committed prefix of the completion (cut at EOS)
        self.forward_passes = self.computed_tokens = 0
        self.arrival_time = arrival_time
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.first_block_time: float | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.last_scheduled = -1  # iteration of the last pass it took part in (for fair batching)

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _block_range(self) -> tuple[int, int]:
        start = self.prompt_length + self.block * self.request.block_length
        return start, start + self.request.block_length

    def _block_schedule(self) -> torch.Tensor:
        start, end = self._block_range()
        return llada_transfer_counts((self.x[:, start:end] == self.params.mask_id).sum(-1), self.params.steps_per_block)

    def _span(self) -> tuple[int, int]:
        """What a cached pass computes: from the prefix cut to the block's end (dual cache) or the sequence's."""
        stop = self._block_range()[1] if self.request.dual_cache else self.length
        return prefix_cut(self._block_range()[0], self.shift_logits), stop

    @property
    def query_length(self) -> int:
        """Positions the next pass computes for this sequence."""
        if self.cache is None:
            return self.length
        cut, stop = self._span()
        return stop - cut

    def plan(self) -> PassPlan:
        if self.cache is not None:
            cut, stop = self._span()
            return PassPlan(self.x[0, cut:stop].tolist(), cut, self.cache, self.suffix, None, None)
        if not self.request.prefix_cache:
            return PassPlan(self.x[0].tolist(), 0, None, None, None, None)
        cut, stop = self._span()
        return PassPlan(self.x[0].tolist(), 0, None, None, cut, stop if self.request.dual_cache else None)

    def advance(self, plan: PassPlan, logits: torch.Tensor, kept: KVCache | None, kept_suffix: KVCache | None,
                now: float) -> list[StreamEvent]:
        """Apply one step from this pass's `logits` (1, positions of the plan, vocab) and
        keep the caches the plan asked for; returns the events it produced and sets
        `finish_reason` when done."""
        if plan.keep is not None:
            self.cache, self.suffix = kept, kept_suffix
        start, end = self._block_range()
        self.x = denoise_step(self.x, logits, plan.offset, start, end, self.schedule, self.step, self.params,
                              self.generator)
        self.step += 1
        self.forward_passes += 1
        self.computed_tokens += len(plan.token_ids)
        events = self._release(now)
        if block_done(self.x, start, end, self.step, self.params):
            events.append(StreamEvent(BLOCK, self.request_id, now, block=self.block))
            if self.first_block_time is None:
                self.first_block_time = now
            if not self.finished:
                self.block, self.step, self.cache, self.suffix = self.block + 1, 0, None, None
                self.schedule = self._block_schedule()
        return events

    def _release(self, now: float) -> list[StreamEvent]:
        """Stream what the contiguous committed prefix gained; finish on EOS, a stop
        string, or once no mask is left (committed tokens never change again)."""
        done = len(self.committed)
        tail = self.x[0, self.prompt_length + done:].tolist()
        new = tail[:tail.index(self.params.mask_id)] if self.params.mask_id in tail else tail
        ends = [i for i, token in enumerate(new) if token in self.end_ids]
        if ends:
            new = new[:ends[0]]
            self.finish_reason = STOP
        elif done + len(new) == self.request.max_tokens:
            self.finish_reason = LENGTH
        if not new and not self.finished:
            return []
        self.committed += new
        text, stopped = self.text.update(self.committed, final=self.finished)
        if stopped:
            self.finish_reason = STOP
        if not new and not text:
            return []
        if new and self.first_token_time is None:
            self.first_token_time = now
        last = len(self.committed) - 1
        return [StreamEvent(TOKENS, self.request_id, now, new, text, max(last, 0) // self.request.block_length)]

    def abort(self, reason: str, error: str | None = None) -> None:
        """Finish early: `cancelled` by the caller, or `error` when its pass failed."""
        self.finish_reason, self.error = reason, error

    def output(self, now: float) -> RequestOutput:
        usage = Usage(self.prompt_length, len(self.committed), self.forward_passes, self.computed_tokens)
        return RequestOutput(self.request_id, list(self.committed), self.text.text, self.finish_reason, usage,
                             self.request.seed, self.arrival_time, self.scheduled_time, self.first_token_time,
                             self.first_block_time, now, self.error)
