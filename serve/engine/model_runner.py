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
  right-padded), where each query's keys go (`ArenaPass`), each row's first position, how
  many queries and arena positions it has (the masks are computed from them inside the
  pass), and where its block starts: the head computes the logits of the block's
  positions only, the ones a step reads. All in one buffer (`PassInputs`), moved to the
  device by one asynchronous copy: filling a pass never waits for the GPU.
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
import math
import time
from dataclasses import dataclass

import numpy as np
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


class PassInputs:
    """Every integer input of one pass shape in one buffer, so that filling a pass never waits for the GPU: the
    host writes a pinned copy and ONE asynchronous copy moves it to the device (a plain copy from pageable memory
    synchronises the stream, once per tensor). On the CPU the host buffer is the pass's buffer."""

    def __init__(self, shape: PassShape, device: torch.device):
        rows, queries = shape.rows, shape.queries
        sizes = {"ids": (rows, queries), "logits_at": (rows, shape.block), "write_slots": (rows, queries),
                 "write_positions": (rows, queries), "query_start": (rows,), "lengths": (rows,), "reach": (rows,),
                 "read_slots": (rows,)}
        total = sum(math.prod(size) for size in sizes.values())
        self.host = torch.zeros(total, dtype=torch.long, pin_memory=device.type == "cuda")
        self.device = torch.zeros(total, dtype=torch.long, device=device) if device.type == "cuda" else self.host
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # recorded after each copy
        self.staged: dict[str, np.ndarray] = {}  # what the host writes
        self.views: dict[str, torch.Tensor] = {}  # what the pass reads
        offset = 0
        for name, size in sizes.items():
            span = slice(offset, offset + math.prod(size))
            self.staged[name], self.views[name] = self.host[span].view(size).numpy(), self.device[span].view(size)
            offset = span.stop

    def stage(self) -> dict[str, np.ndarray]:
        """The host arrays to fill; waits only for this buffer's previous copy (done once a step has synced)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.staged

    def upload(self) -> None:
        if self.copied is not None:
            self.device.copy_(self.host, non_blocking=True)
            self.copied.record()


class StaticPass:
    """The input buffers of one pass shape and the pass over them; `capture()` records it as a CUDA graph."""

    def __init__(self, model: DiffusionLM, arena: KVArena | None, shape: PassShape, pad_id: int,
                 outputs: LogitsBuffers | None = None):
        device = model.embed_weight.device
        self.model, self.shape, self.outputs, self.pad_id = model, shape, outputs, pad_id
        self.kept = outputs is not None
        self.scratch = arena.scratch if arena is not None else 0
        self.inputs = PassInputs(shape, device)
        views = self.inputs.views
        self.query_index = torch.arange(shape.queries, device=device)
        self.query_mask = torch.zeros((shape.rows, shape.queries), dtype=torch.bool, device=device)
        self.key_index = torch.arange(shape.context, device=device)
        self.access: ArenaPass | None = None  # passes that neither read nor keep a cache skip the arena
        if arena is not None and (shape.write or shape.context):
            self.access = ArenaPass(
                arena.layers, views["write_slots"], views["write_positions"], views["query_start"], shape.context,
                key_mask=torch.zeros((shape.rows, shape.context), dtype=torch.bool, device=device)
                if shape.context else None,
                read_slots=views["read_slots"] if shape.gather else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # a kept pass's rows of the shared logits buffer
        self.padded = True  # a kept (bucketed) pass always applies the query mask; a one-off only when rows differ
        self.fill([], [])  # no rows yet: a run before the first fill (a capture's eager run) writes into scratch

    def fill(self, plans: list[PassPlan], slots: list[int]) -> None:
        """Write this batch's inputs, every row of the shape (rows beyond the batch: no queries, writing into the
        scratch slot), and start their one copy to the device."""
        shape, staged = self.shape, self.inputs.stage()
        queries = np.arange(shape.queries)
        lengths, start, reach, first, slot = (np.zeros(shape.rows, dtype=np.int64) for _ in range(5))
        slot[:] = self.scratch
        ids = staged["ids"]
        ids[:] = self.pad_id
        for row, plan in enumerate(plans):
            ids[row, :len(plan.token_ids)] = plan.token_ids
            lengths[row], start[row], first[row] = len(plan.token_ids), plan.offset, plan.logits[0] - plan.offset
            reach[row] = max(plan.cache_length, plan.offset + len(plan.token_ids))  # cached and written positions
            slot[row] = slots[row]
        np.minimum(first[:, None] + np.arange(shape.block), shape.queries - 1, out=staged["logits_at"])
        real = queries < lengths[:, None]
        np.copyto(staged["write_slots"], np.where(real, slot[:, None], self.scratch))
        np.copyto(staged["write_positions"], np.where(real, start[:, None] + queries, queries))
        staged["query_start"][:], staged["lengths"][:], staged["reach"][:] = start, lengths, reach
        staged["read_slots"][:] = slot
        self.inputs.upload()
        self.padded = self.kept or bool((lengths < shape.queries).any())  # spare rows have no queries

    def forward(self) -> torch.Tensor:
        """The pass: run the model (through the arena, if it reads or keeps a cache), keep the logits."""
        views = self.inputs.views
        if self.padded:
            torch.lt(self.query_index, views["lengths"][:, None], out=self.query_mask)
        if self.access is not None and self.access.key_mask is not None:  # each row: its sequence's positions
            torch.lt(self.key_index, views["reach"][:, None], out=self.access.key_mask)
        out = self.model(views["ids"], attention_mask=self.query_mask if self.padded else None, arena=self.access,
                         logits_at=views["logits_at"])
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
