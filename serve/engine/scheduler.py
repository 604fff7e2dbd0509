"""Step-level scheduling: who waits, who runs (each in its own slot of the runner's KV arena), and
which rows share the next forward pass.

Pure bookkeeping (no tensors, no model), called only from the engine's event
loop. Admission is first come, first served: a waiting request takes a free slot
when the running rows plus it still fit the token budget; the head of the queue
is never overtaken, so long requests cannot starve. Every iteration then picks
one batch from the running sequences, least recently served first, adding rows
while the batch stays within `max_num_seqs`, `max_tokens_per_step` (rows x
longest row) and `max_padding_ratio`; a row left out goes first next time.

Slots stay packed: the running sequences hold slots 0 .. n-1, so that a pass over all of
them reads its rows' caches as one view of the arena (no gather). When a sequence leaves,
the one in the highest slot moves into the freed one; the runner copies its cached
positions before the next pass (`SlotMove`, `take_moves`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from serve.engine.config import EngineConfig
from serve.engine.requests import EngineOverloaded
from serve.engine.sequence import Sequence

RETRY_AFTER_BOUNDS = (1, 60)
SERVICE_EMA_WEIGHT = 0.2


@dataclass(frozen=True)
class SlotMove:
    """A running sequence moved from slot `source` to slot `target`; the runner copies its first `length`
    cached positions (0: it holds no cache yet, nothing to copy)."""

    source: int
    target: int
    length: int


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))  # the runner's KV arena rows, lowest last
        self.moves: list[SlotMove] = []  # since the last pass, in order
        self.iteration = 0
        self._service_s: float | None = None  # moving average of scheduled-to-finished time

    def add(self, seq: Sequence) -> None:
        """Queue a new request, or refuse it at once when the queue is full. A slot freed since the last
        pass is taken at the next one, so the requests that will take one do not count as queued: the
        engine refuses only beyond `max_num_seqs` running plus `max_queue` waiting (what Serve sends it)."""
        if len(self.waiting) - len(self.free_slots) >= self.config.max_queue:
            raise EngineOverloaded(self.retry_after(), len(self.waiting))
        self.waiting.append(seq)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request: the recent
        service time, scaled by how many queue ahead per slot."""
        if self._service_s is None:
            return RETRY_AFTER_BOUNDS[0]
        wait = self._service_s * (len(self.waiting) + 1) / self.config.max_num_seqs
        return int(min(max(math.ceil(wait), RETRY_AFTER_BOUNDS[0]), RETRY_AFTER_BOUNDS[1]))

    def remove(self, seq: Sequence, now: float) -> None:
        """Take a finished (or cancelled) sequence out, freeing its slot (or, to keep slots packed, the slot
        of the sequence that moves into it)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        self.running.remove(seq)
        freed, seq.slot = seq.slot, None
        last = max(self.running, key=lambda s: s.slot, default=None)
        if last is not None and last.slot > freed:
            self.moves.append(SlotMove(last.slot, freed, last.length if last.cached else 0))
            last.slot, freed = freed, last.slot
        self.free_slots.append(freed)
        self.free_slots.sort(reverse=True)
        if seq.scheduled_time is not None:
            service = now - seq.scheduled_time
            self._service_s = service if self._service_s is None else \
                (1 - SERVICE_EMA_WEIGHT) * self._service_s + SERVICE_EMA_WEIGHT * service

    def take_moves(self) -> list[SlotMove]:
        """The slot moves the runner must apply before the next pass (and forget)."""
        moves, self.moves = self.moves, []
        return moves

    def schedule(self, now: float) -> list[Sequence]:
        """Admit what fits, then return this iteration's batch (empty: nothing to do)."""
        self._admit(now)
        batch: list[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.last_scheduled):  # stable: arrival order breaks ties
            if self._fits([s.query_length for s in batch] + [seq.query_length], padding=True):
                batch.append(seq)
        if batch:
            for seq in batch:
                seq.last_scheduled = self.iteration
            self.iteration += 1
        return batch

    def _admit(self, now: float) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            head = self.waiting[0]
            if self.running and not self._fits([s.length for s in self.running] + [head.length], padding=False):
                break
            self.running.append(self.waiting.popleft())
            head.scheduled_time = now
            head.slot = self.free_slots.pop()

    def _fits(self, lengths: list[int], padding: bool) -> bool:
        longest = max(lengths)
        if len(lengths) > self.config.max_num_seqs or len(lengths) * longest > self.config.max_tokens_per_step:
            return False
        return not padding or longest <= self.config.max_padding_ratio * min(lengths)
