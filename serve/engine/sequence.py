"""One request's denoising state, advanced one step at a time by the engine.

A sequence is `prompt + [MASK] * max_tokens`, decoded block by block exactly as
`sinkprune.dlm.generate.generate` decodes that request alone: the same schedule,
the same `denoise_step`, its own seeded generator. What the engine adds is
bookkeeping: its slot in the runner's KV arena and whether the slot holds the current
block's prefix (and dual) cache, which committed tokens are new (for streaming), when
the request is done (EOS, a stop token id, a stop string, or no mask left), and usage.

A sequence keeps its tokens on the host: planning a pass and streaming what it committed
read no device tensor. After a pass, `advance_batch` runs the step of every greedy row of
the same kind (policy, threshold, block length) as one batched `denoise_step` over their
blocks, with one copy back to the host, instead of a step and a synchronisation per row;
rows that draw random numbers per position (temperature > 0, `random`, `origin`) step alone
with their own generator, as `generate()` steps them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from sinkprune.dlm.decoding import draws_per_position, llada_transfer_counts
from sinkprune.dlm.generate import DenoiseParams, block_done, denoise_step, prefix_cut
from serve.engine.detokenizer import IncrementalText
from serve.engine.requests import BLOCK, LENGTH, STOP, TOKENS, PreparedRequest, RequestOutput, \
    StreamEvent, Usage


@dataclass
class PassPlan:
    """What one sequence contributes to the next forward pass."""

    token_ids: list[int]  # the positions to compute: the whole sequence, or a span from `offset` on
    offset: int  # where `token_ids` start in the sequence
    cached: bool  # attend to the slot's cached positions outside the span (before it; after it: dual cache)
    cache_length: int  # how many positions the slot holds (the sequence's length when they were computed)
    keep: bool  # after this pass, the slot holds this (full) pass's keys and values
    logits: tuple[int, int]  # positions [from, to) of the sequence whose logits the step reads


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
        self.tokens: list[int] = request.prompt_ids + [mask_id] * request.max_tokens  # on the host
        self.text = IncrementalText(tokenizer, request.stop)
        self.block = self.step = 0
        self.schedule = self._block_schedule()
        self.slot: int | None = None  # its rows of the runner's KV arena, from the scheduler while it runs
        self.cached = False  # the slot holds the current block's caches (its first pass ran)
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
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _block_range(self) -> tuple[int, int]:
        start = self.prompt_length + self.block * self.request.block_length
        return start, start + self.request.block_length

    def _block_schedule(self) -> torch.Tensor:
        start, end = self._block_range()
        masked = torch.tensor([self.tokens[start:end].count(self.params.mask_id)])
        return llada_transfer_counts(masked, self.params.steps_per_block)

    def _span(self) -> tuple[int, int]:
        """What a cached pass computes: from the prefix cut to the block's end (dual cache) or the sequence's."""
        stop = self._block_range()[1] if self.request.dual_cache else self.length
        return prefix_cut(self._block_range()[0], self.shift_logits), stop

    @property
    def query_length(self) -> int:
        """Positions the next pass computes for this sequence."""
        if not self.cached:
            return self.length
        cut, stop = self._span()
        return stop - cut

    def plan(self) -> PassPlan:
        cut, stop = self._span() if self.cached else (0, self.length)
        # greedy steps read only the block's logits; random ones draw over the pass's span, as the reference does
        read = (cut, stop) if draws_per_position(self.params.remasking, self.params.temperature) \
            else self._block_range()
        return PassPlan(self.tokens[cut:stop], cut, self.cached, self.length if self.cached else 0,
                        not self.cached and self.request.prefix_cache, read)

    @property
    def batch_key(self) -> tuple | None:
        """Rows with equal keys step together (`advance_batch`); None: this one steps alone."""
        params = self.params
        if draws_per_position(params.remasking, params.temperature):
            return None
        return params.remasking, params.threshold, params.steps_per_block, params.mask_id, self.request.block_length

    def advance(self, plan: PassPlan, logits: torch.Tensor, now: float) -> list[StreamEvent]:
        """Apply one step from the `logits` (1, positions, vocab) of the plan's `logits` positions; returns
        the events it produced and sets `finish_reason` when done."""
        start, end = self._block_range()
        x = torch.tensor([self.tokens], device=logits.device)
        x = denoise_step(x, logits, plan.logits[0], start, end, self.schedule.to(logits.device), self.step,
                         self.params, self.generator)
        return self.stepped(plan, x[0, start:end].tolist(), now)

    def stepped(self, plan: PassPlan, block: list[int], now: float) -> list[StreamEvent]:
        """Take `block`, the current block's tokens after this step, and do the bookkeeping."""
        if plan.keep:
            self.cached = True
        start, end = self._block_range()
        self.tokens[start:end] = block
        self.step += 1
        self.forward_passes += 1
        self.computed_tokens += len(plan.token_ids)
        events = self._release(now)
        if self._block_done():
            events.append(StreamEvent(BLOCK, self.request_id, now, block=self.block))
            if self.first_block_time is None:
                self.first_block_time = now
            if not self.finished:
                self.block, self.step, self.cached = self.block + 1, 0, False
                self.schedule = self._block_schedule()
        return events

    def _block_done(self) -> bool:
        start, end = self._block_range()
        return block_done(torch.tensor([self.tokens[start:end]]), 0, end - start, self.step, self.params)

    def _release(self, now: float) -> list[StreamEvent]:
        """Stream what the contiguous committed prefix gained; finish on EOS, a stop
        string, or once no mask is left (committed tokens never change again)."""
        done = len(self.committed)
        tail = self.tokens[self.prompt_length + done:]
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


def advance_batch(batch: list[Sequence], plans: list[PassPlan], logits: torch.Tensor, now: float
                  ) -> list[list[StreamEvent]]:
    """Every row's step from the pass's `logits` (rows, positions, vocab), in batch order: rows of one
    `batch_key` as one `denoise_step` over their blocks (each at its own step, with its own schedule),
    the others alone. Each row's tokens are what `Sequence.advance` would give it."""
    events: list[list[StreamEvent]] = [[] for _ in batch]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, seq in enumerate(batch):
        if seq.batch_key is None:
            width = plans[row].logits[1] - plans[row].logits[0]
            events[row] = seq.advance(plans[row], logits[row:row + 1, :width], now)
        else:
            groups[seq.batch_key].append(row)
    for rows in groups.values():
        members = [batch[row] for row in rows]
        first, width = members[0], members[0].request.block_length
        ranges = [seq._block_range() for seq in members]
        blocks = torch.tensor([seq.tokens[start:end] for seq, (start, end) in zip(members, ranges)],
                              device=logits.device)
        picked = logits[rows[0]:rows[0] + 1] if len(rows) == 1 else \
            logits.index_select(0, torch.tensor(rows, device=logits.device))
        schedule = torch.cat([seq.schedule for seq in members]).to(logits.device)
        stepped = denoise_step(blocks, picked[:, :width], 0, 0, width, schedule, [seq.step for seq in members],
                               first.params, None).tolist()
        for row, seq, block in zip(rows, members, stepped):
            events[row] = seq.stepped(plans[row], block, now)
    return events
