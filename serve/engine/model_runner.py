"""One batched forward pass over a scheduled batch of sequences, then each sequence's step.

The runner owns every tensor a pass touches, so that a pass has fixed shapes and
addresses and, on a GPU, is captured once as a CUDA graph and replayed (the CPU runs
the same code eagerly):

- the KV arena (`KVArena`): per layer, keys and values of every slot's positions.
  Every pass writes its queries' keys and values into their slots in place (a block's
  first, full pass all of them; its later passes their span, as Fast-dLLM's DualCache
  overwrites the block), then each row attends its slot's positions in order: Fast-dLLM's
  prefix and dual caches are the arena itself, never concatenated, cropped or copied.
  The scheduler keeps the running sequences in slots 0 .. n-1, so a pass over all of
  them reads one view of the arena; a pass over some of them gathers their slots. One
  more slot is scratch for padded queries.
- per shape (`PassShape`: rows, queries, context, block width, gathered or not), the
  inputs of a pass (`StaticPass`): token ids with real positions first (rows are
  right-padded), the query mask, where each query's keys go (`ArenaPass`), each row's
  first position, which arena positions it attends (its sequence's), and where its block
  starts: the head computes the logits of the block's positions only, the ones a step reads.
- the logits: one buffer per block width, shared by every kept pass of that width.

Graphs of the dual-cache block passes (most of a request's steps) are captured when the
replica starts (`warm_up`), for every row and context bucket of the block lengths
configured; other shapes (full passes) are captured on first use.

On a GPU with graphs, shapes are rounded up to buckets so that few graphs serve every
batch; masks keep padded rows and positions out of every real row's result, which is
the one the row gets alone (tests/test_engine.py compares with `generate()`).
Runs in the engine's worker thread, never on the event loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from sinkprune.dlm.layers import ArenaPass, LayerKV
from sinkprune.dlm.model import DiffusionLM
from serve.engine.requests import StreamEvent
from serve.engine.scheduler import SlotMove
from serve.engine.sequence import PassPlan, Sequence, advance_batch

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    events: list[list[StreamEvent]]  # per sequence of the batch, in order
    query_tokens: int  # positions computed, padding between rows included (rows x longest row)
    cached_tokens: int  # cached positions attended to (prefix and suffix caches), padding included
    cached_rows: int  # rows that ran against a cache
    started: float
    finished: float  # after every sequence's step (events are stamped when the forward pass ended)


@dataclass(frozen=True)
class PassShape:
    rows: int
    queries: int
    context: int  # arena positions each row may attend, from 0 (0: no cache in this pass, rows attend their own)
    write: bool  # some row keeps this pass's keys and values in its slot
    block: int  # positions whose logits each row reads: its block (greedy steps) or its span (random ones)
    gather: bool = False  # the rows' slots are not 0..rows-1: the pass gathers them (a copy) instead of a view


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket(shape: PassShape, max_rows: int, max_length: int) -> PassShape:
    """The graph shape serving `shape`: rows to a power of two (at most `max_rows`), queries to a multiple
    of 16 up to 64 and of 64 beyond, the block to a multiple of 16, context to a multiple of 64 up to 512
    and of an eighth of the next power of two beyond (at most 1/8 padding, few graphs); each at most
    `max_length`."""
    rows = min(1 << (shape.rows - 1).bit_length(), max_rows)
    queries = min(round_up(shape.queries, 16 if shape.queries <= 64 else 64), max_length)
    context = min(round_up(shape.context, max(64, (1 << (shape.context - 1).bit_length()) // 8)), max_length) \
        if shape.context else 0
    return PassShape(rows, queries, context, shape.write, min(round_up(shape.block, 16), queries), shape.gather)


class KVArena:
    """Keys and values per layer, (slots + 1, kv_heads, max_length, head_dim); the last slot is scratch."""

    def __init__(self, model: DiffusionLM, slots: int, max_length: int):
        config, weight = model.config, model.embed_weight
        shape = (slots + 1, config.num_kv_heads, max_length, config.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                               torch.zeros(shape, dtype=weight.dtype, device=weight.device))
                       for _ in range(config.num_layers)]
        self.scratch = slots

    @property
    def nbytes(self) -> int:
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.layers)


class StaticPass:
    """The input buffers of one pass shape and the pass over them; `capture()` records it as a CUDA graph."""

    def __init__(self, model: DiffusionLM, arena: KVArena | None, shape: PassShape, pad_id: int,
                 outputs: LogitsBuffers | None = None):
        device = model.embed_weight.device
        self.model, self.shape, self.outputs = model, shape, outputs
        self.kept = outputs is not None
        self.scratch = arena.scratch if arena is not None else 0
        self.ids = torch.full((shape.rows, shape.queries), pad_id, dtype=torch.long, device=device)
        self.query_mask = torch.zeros((shape.rows, shape.queries), dtype=torch.bool, device=device)
        self.logits_at = torch.zeros((shape.rows, shape.block), dtype=torch.long, device=device)
        self.access: ArenaPass | None = None  # passes that neither read nor keep a cache skip the arena
        if arena is not None and (shape.write or shape.context):
            self.access = ArenaPass(
                arena.layers,
                write_slots=torch.full((shape.rows, shape.queries), self.scratch, dtype=torch.long, device=device),
                write_positions=torch.arange(shape.queries, device=device).repeat(shape.rows, 1),
                query_start=torch.zeros((shape.rows,), dtype=torch.long, device=device),
                length=shape.context,
                key_mask=torch.zeros((shape.rows, shape.context), dtype=torch.bool, device=device)
                if shape.context else None,
                read_slots=torch.full((shape.rows,), self.scratch, dtype=torch.long, device=device)
                if shape.gather else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # a kept pass's rows of the shared logits buffer
        self.padded = True  # a kept (bucketed) pass always applies the query mask; a one-off only when rows differ

    def fill(self, plans: list[PassPlan], slots: list[int]) -> None:
        """Copy this batch's inputs into the buffers (rows beyond the batch keep stale, harmless values and
        write into the scratch slot)."""
        shape, rows = self.shape, len(plans)
        ids = torch.zeros((rows, shape.queries), dtype=torch.long)
        real = torch.zeros((rows, shape.queries), dtype=torch.bool)
        for row, plan in enumerate(plans):
            ids[row, :len(plan.token_ids)] = torch.tensor(plan.token_ids)
            real[row, :len(plan.token_ids)] = True
        self.padded = self.kept or rows < shape.rows or not bool(real.all())
        self.ids[:rows].copy_(ids)
        self.query_mask[:rows].copy_(real)
        self.query_mask[rows:] = False
        first = torch.tensor([plan.logits[0] - plan.offset for plan in plans])
        self.logits_at[:rows].copy_((first[:, None] + torch.arange(shape.block)).clamp(max=shape.queries - 1))
        access = self.access
        if access is None:
            return
        start = torch.tensor([p.offset for p in plans])
        positions = start[:, None] + torch.arange(shape.queries)
        access.write_slots[:rows].copy_(torch.where(real, torch.tensor(slots)[:, None], self.scratch))
        access.write_slots[rows:] = self.scratch
        access.write_positions[:rows].copy_(torch.where(real, positions, torch.arange(shape.queries)))
        access.query_start[:rows].copy_(start)
        if shape.context:
            # every row attends its sequence's positions: cached ones and those this pass writes
            reach = torch.tensor([max(p.cache_length, p.offset + len(p.token_ids)) for p in plans])
            access.key_mask[:rows].copy_(torch.arange(shape.context)[None, :] < reach[:, None])
            access.key_mask[rows:] = False
        if access.read_slots is not None:
            access.read_slots[:rows].copy_(torch.tensor(slots))

    def forward(self) -> torch.Tensor:
        """The pass: run the model (through the arena, if it reads or keeps a cache), keep the logits."""
        out = self.model(self.ids, attention_mask=self.query_mask if self.padded else None, arena=self.access,
                         logits_at=self.logits_at)
        if not self.kept:
            return out.logits
        if self.logits is None:  # the first, eager run (never inside a capture)
            self.logits = self.outputs.get(out.logits)[:self.shape.rows]
        self.logits.copy_(out.logits)
        return self.logits

    def capture(self, pool) -> None:
        """Run once eagerly (kernel choices, plans, autotuning), then record the pass as a CUDA graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.forward()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class LogitsBuffers:
    """One (slots, block width, vocab) logits buffer per block width, shared by the kept passes of that
    width: a pass's logits are read before the next pass runs, so graphs need not each hold their own."""

    def __init__(self, slots: int):
        self.slots = slots
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.shape[1:], like.dtype, like.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty((self.slots, *like.shape[1:]), dtype=like.dtype, device=like.device)
        return self.buffers[key]

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers.values())


class ModelRunner:
    def __init__(self, model: DiffusionLM, slots: int, max_length: int, cuda_graphs: bool = True):
        self.model = model
        config = model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else config.mask_token_id
        self.device = model.embed_weight.device
        self.slots, self.max_length = slots, max_length
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.bucketed = self.cuda_graphs  # shapes rounded up to buckets whose passes are kept (tests set it on CPU)
        self.arena: KVArena | None = None  # made by the first pass that keeps a cache
        self.passes: dict[PassShape, StaticPass] = {}  # per bucket, when bucketed
        self.outputs = LogitsBuffers(slots)
        self.capture_seconds = 0.0
        self.warm_up_report: dict = {"passes": 0, "seconds": 0.0, "memory_bytes": 0}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def stats(self) -> dict:
        """What the static path holds: graphs captured (and what capturing cost), the KV arena's and the
        logits buffers' bytes, and what capturing at start took (`warm_up`)."""
        return {"cuda_graphs": self.cuda_graphs, "captured": len(self.passes) if self.cuda_graphs else 0,
                "capture_seconds": round(self.capture_seconds, 3),
                "kv_arena_bytes": self.arena.nbytes if self.arena is not None else 0,
                "logits_buffer_bytes": self.outputs.nbytes,
                "captured_at_start": self.warm_up_report}

    def block_pass_shapes(self, block_lengths: tuple[int, ...]) -> list[PassShape]:
        """The buckets of every dual-cache block pass the engine can run for these block lengths: any number
        of rows, a block (one position more for a shifted model) against a cache of any length it fits in."""
        shift = int(self.model.shift_logits)

        def bucketed(rows: int, context: int, block: int) -> PassShape:
            return bucket(PassShape(rows, block + shift, context, False, block), self.slots, self.max_length)

        shapes = {bucketed(rows, context, block)
                  for block in block_lengths if block + shift <= self.max_length
                  for rows in {bucketed(rows, 1, block).rows for rows in range(1, self.slots + 1)}
                  for context in {bucketed(1, context, block).context
                                  for context in range(block + 1, self.max_length + 1)}}
        return sorted(shapes, key=lambda shape: (shape.block, shape.rows, shape.context))

    def warm_up(self, block_lengths: tuple[int, ...]) -> dict:
        """Capture the block passes' graphs now, at replica start, so that no request pays for one; reports
        how many, the seconds and the device memory they took. Nothing to do without buckets (CPU)."""
        if not self.bucketed or not block_lengths:
            return self.warm_up_report
        self._arena()
        memory = torch.cuda.memory_reserved(self.device) if self.cuda_graphs else 0
        started, before = time.perf_counter(), len(self.passes)
        for shape in self.block_pass_shapes(block_lengths):
            self._static_pass(shape)
        memory = torch.cuda.memory_reserved(self.device) - memory if self.cuda_graphs else 0
        self.warm_up_report = {"passes": len(self.passes) - before, "seconds": round(time.perf_counter() - started, 3),
                               "memory_bytes": memory}
        log.info("warm-up: %d passes of block lengths %s in %.1f s, %.1f MB", self.warm_up_report["passes"],
                 block_lengths, self.warm_up_report["seconds"], memory / 2 ** 20)
        return self.warm_up_report

    def _arena(self) -> KVArena:
        if self.arena is None:
            self.arena = KVArena(self.model, self.slots, self.max_length)
            log.info("KV arena: %d slots x %d positions, %.1f MB", self.slots, self.max_length,
                     self.arena.nbytes / 2 ** 20)
        return self.arena

    def _static_pass(self, shape: PassShape) -> StaticPass:
        arena = self._arena() if shape.write or shape.context else self.arena
        if not self.bucketed:
            return StaticPass(self.model, arena, shape, self.pad_id)
        shape = bucket(shape, self.slots, self.max_length)
        static = self.passes.get(shape)
        if static is None:
            started = time.perf_counter()
            static = self.passes[shape] = StaticPass(self.model, arena, shape, self.pad_id, self.outputs)
            if self.cuda_graphs:
                static.capture(self._pool)
                self.capture_seconds += time.perf_counter() - started
                log.info("captured a CUDA graph for %s in %.2f s (%d graphs)", shape,
                         time.perf_counter() - started, len(self.passes))
            else:
                static.forward()  # the eager run a capture starts with: the shape runs on stale buffers
        return static

    @torch.no_grad()
    def step(self, batch: list[Sequence], moves: list[SlotMove] = ()) -> StepResult:
        """Apply the scheduler's slot moves, then run one pass for `batch` and each row's step; the events
        come back in the batch's order."""
        started = time.perf_counter()
        self.move(moves)
        order = sorted(range(len(batch)), key=lambda row: batch[row].slot)  # row i reads slot i where it can
        rows = [batch[row] for row in order]
        plans = [seq.plan() for seq in rows]
        static = self.prepare(plans, [seq.slot for seq in rows])
        logits = static.run()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        computed = time.perf_counter()
        stepped = advance_batch(rows, plans, logits, computed)
        events: list[list[StreamEvent]] = [[] for _ in batch]
        for row, row_events in zip(order, stepped):
            events[row] = row_events
        shape = static.shape
        cached = sum(plan.cached for plan in plans)
        return StepResult(events, len(batch) * max(len(plan.token_ids) for plan in plans), cached * shape.context,
                          cached, started, time.perf_counter())

    def prepare(self, plans: list[PassPlan], slots: list[int]) -> StaticPass:
        """The pass for these rows (plans and their slots), its buffers filled, ready to `run()`."""
        longest = max(len(plan.token_ids) for plan in plans)
        context = max(max(plan.cache_length, plan.offset + len(plan.token_ids)) for plan in plans) \
            if any(plan.cached for plan in plans) else 0
        block = max(plan.logits[1] - plan.logits[0] for plan in plans)
        gather = bool(context) and slots != list(range(len(slots)))
        static = self._static_pass(PassShape(len(plans), longest, context, any(plan.keep for plan in plans),
                                             block, gather))
        static.fill(plans, slots)
        return static

    def move(self, moves: list[SlotMove]) -> None:
        """Copy each moved sequence's cached positions to its new slot, in the order the scheduler moved them."""
        for move in moves:
            if move.length:
                for kv in self._arena().layers:
                    kv.keys[move.target, :, :move.length] = kv.keys[move.source, :, :move.length]
                    kv.values[move.target, :, :move.length] = kv.values[move.source, :, :move.length]
