"""The runner's static-buffer path on CPU: the same code a GPU captures as CUDA graphs, run eagerly.

With `bucketed` set, every pass runs at its bucket's shape (padding rows, queries and context
positions, buffers kept and refilled across steps, stale rows left in them), exactly as graphs
replay it; outputs must still equal `generate()` on each request alone.
"""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.model_runner import ModelRunner, PassShape, StaticPass, bucket
from serve.engine.requests import GenerationRequest
from serve.engine.sequence import PassPlan
from sinkprune.dlm.layers import ArenaPass, LayerKV
from tests.conftest import random_model
from tests.test_engine import final, random_requests, reference, serve


def test_buckets_round_shapes_up_within_the_limits():
    assert bucket(PassShape(3, 32, 100, False, 32), 8, 512) == PassShape(4, 32, 128, False, 32)
    assert bucket(PassShape(5, 33, 0, True, 20), 8, 512) == PassShape(8, 48, 0, True, 32)
    assert bucket(PassShape(7, 200, 500, False, 8), 6, 512) == PassShape(6, 256, 512, False, 16)
    assert bucket(PassShape(1, 700, 0, True, 64), 4, 640) == PassShape(1, 640, 0, True, 64)
    # context: multiples of 64 up to 512, then of an eighth of the next power of two (at most 1/8 padding)
    assert [bucket(PassShape(1, 32, c, False, 32), 1, 8192).context for c in (1, 64, 65, 513, 700, 1025, 5000)] \
        == [64, 64, 128, 640, 768, 1280, 5120]
    assert bucket(PassShape(1, 8, 3, False, 40), 1, 512).block == 16  # never wider than the queries


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_bucketed_static_passes_give_every_request_its_own_output(model_type):
    model = random_model(model_type)
    rng = random.Random(21)
    requests = random_requests(model_type, 10, 0.5, rng)
    arrivals = sorted(rng.randrange(0, 12) for _ in requests)
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=3, max_padding_ratio=4.0))
    engine.runner.bucketed = True
    events, steps = asyncio.run(serve(engine, requests, arrivals))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(model, request, request.seed), request
    shapes = engine.runner.passes
    assert len(shapes) >= 2 and all(s == bucket(s, 3, engine.runner.max_length) for s in shapes)
    assert any(s.context for s in shapes) and any(s.write for s in shapes)  # cached passes and full ones
    assert engine.scheduler.free_slots and sorted(engine.scheduler.free_slots) == [0, 1, 2]  # all slots back
    stats = engine.runner.stats()
    assert stats["cuda_graphs"] is False and stats["captured"] == 0  # the CPU never captures
    config = model.config
    assert stats["kv_arena_bytes"] == (2 * config.num_layers * 4 * config.num_kv_heads * engine.runner.max_length
                                       * config.head_dim * model.embed_weight.element_size())


def test_slots_are_reused_and_never_shared_by_running_sequences():
    model = random_model("llada")
    requests = random_requests("llada", 8, 0.0, random.Random(4))
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=2))
    seen: list[set[int]] = []
    original = engine.runner.step

    def recording(batch, moves=()):
        slots = [seq.slot for seq in engine.scheduler.running]
        assert sorted(slots) == list(range(len(slots)))  # packed: never shared, never a hole
        seen.append(set(slots))
        return original(batch, moves)

    engine.runner.step = recording
    events, _ = asyncio.run(serve(engine, requests, [0] * len(requests)))
    assert all(final(e).finish_reason in ("stop", "length") for e in events)
    assert set().union(*seen) == {0, 1}


def dual_cache_requests(count: int, block_length: int) -> list[GenerationRequest]:
    """Dual-cache requests of two blocks with prompts of 1 to 30 tokens: block passes against many cache lengths."""
    rng = random.Random(5)
    return [GenerationRequest(prompt=[rng.randrange(2, 90) for _ in range(rng.randint(1, 30))],
                              max_tokens=2 * block_length, steps=2 * block_length, block_length=block_length,
                              dual_cache=True, ignore_eos=True, seed=i, request_id=f"w{i}") for i in range(count)]


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_warm_up_prepares_every_block_pass_the_engine_then_runs(model_type):
    """What a replica captures at start covers every dual-cache block pass of that block length: serving
    such requests of any prompt length and concurrency adds no block-pass bucket, and outputs stay exact."""
    model = random_model(model_type)
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=3, max_padding_ratio=64.0, max_model_len=48))
    runner = engine.runner
    runner.bucketed = True
    report = runner.warm_up((4,))
    expected = set(runner.block_pass_shapes((4,)))
    assert set(runner.passes) == expected and report["passes"] == len(expected)
    assert {s.rows for s in expected} == {1, 2, 3} and {s.context for s in expected} == {48}
    assert {s.queries for s in expected} == {16} and all(not s.write and s.block == 16 for s in expected)
    assert runner.stats()["captured_at_start"] == report
    requests = dual_cache_requests(6, block_length=4)
    events, _ = asyncio.run(serve(engine, requests, [0, 0, 0, 1, 2, 2]))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(model, request, request.seed), request
    added = set(runner.passes) - expected
    assert added and all(s.write and not s.context for s in added)  # only the blocks' first (full) passes
    assert runner.stats()["logits_buffer_bytes"] > 0


def test_block_pass_shapes_stay_few_for_long_contexts():
    """Contexts up to 8192 positions and 32 rows: the warm-up's graph count stays small."""
    engine = DLMEngine(random_model("llada"), None, EngineConfig(max_num_seqs=32, max_tokens_per_step=8192))
    engine.runner.max_length = 8192
    shapes = engine.runner.block_pass_shapes((32,))
    assert {s.rows for s in shapes} == {1, 2, 4, 8, 16, 32}
    assert len(shapes) == 6 * 24  # 8 contexts up to 512, then 4 per doubling up to 8192


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_moved_and_gathered_caches_keep_every_output_exact(model_type):
    """Requests of different lengths leave in any order: the sequence in the highest slot moves into the freed
    one with its cached positions (copied before the next pass), and batches that leave a running row out
    gather their slots instead of viewing them; every output still equals generate() alone."""
    model = random_model(model_type)
    rng = random.Random(17)
    requests = [GenerationRequest(prompt=[rng.randrange(2, 90) for _ in range(rng.randint(1, 20))],
                                  max_tokens=rng.choice([8, 16, 24]), steps=24, block_length=8,
                                  dual_cache=i % 3 != 2, prefix_cache=i % 3 == 2, ignore_eos=True, seed=i,
                                  request_id=f"m{i}") for i in range(9)]
    for request in requests:
        request.steps = request.max_tokens
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=3, max_padding_ratio=2.0))
    runner = engine.runner
    moves, shapes = [], []
    original_move, original_pass = runner.move, runner._static_pass

    def recording_move(batch_moves):
        moves.extend(batch_moves)
        return original_move(batch_moves)

    def recording_pass(shape):
        shapes.append(shape)
        return original_pass(shape)

    runner.move, runner._static_pass = recording_move, recording_pass
    events, _ = asyncio.run(serve(engine, requests, [0, 0, 0, 1, 3, 3, 6, 8, 8]))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(model, request, request.seed), request
    assert any(move.length for move in moves)  # a cache really moved between slots
    assert any(shape.gather for shape in shapes) and any(shape.context and not shape.gather for shape in shapes)


def test_an_arena_pass_writes_in_place_and_reads_views():
    """Each query's keys land at its (slot, position), padded ones in scratch; rows read their slots'
    positions in order, as views of the arena (no copy) unless the slots must be gathered."""
    layer = LayerKV(torch.zeros(3, 1, 6, 2), torch.zeros(3, 1, 6, 2))  # slots 0, 1 and scratch 2
    keys = torch.arange(1.0, 9.0).view(2, 1, 2, 2)  # (rows, kv_heads, queries, head_dim)
    write_slots = torch.tensor([[0, 0], [1, 2]])  # row 1's second query is padding
    write_positions = torch.tensor([[3, 4], [0, 1]])
    access = ArenaPass([layer], write_slots, write_positions, torch.tensor([3, 0]), length=5)
    read_keys, read_values = access.exchange(layer, keys, -keys)
    assert torch.equal(layer.keys[0, 0, 3:5], keys[0, 0]) and torch.equal(layer.values[0, 0, 3:5], -keys[0, 0])
    assert torch.equal(layer.keys[1, 0, 0], keys[1, 0, 0]) and not layer.keys[1, 0, 1:].any()
    assert torch.equal(layer.keys[2, 0, 1], keys[1, 0, 1])  # the padded query went to scratch
    assert read_keys.shape == (2, 1, 5, 2) and read_keys.data_ptr() == layer.keys.data_ptr()
    assert torch.equal(read_keys, layer.keys[:2, :, :5])
    gathered = ArenaPass([layer], write_slots, write_positions, torch.tensor([3, 0]), length=5,
                         read_slots=torch.tensor([1, 0]))
    read_keys, _ = gathered.exchange(layer, keys, -keys)
    assert torch.equal(read_keys[0], layer.keys[1, :, :5]) and torch.equal(read_keys[1], layer.keys[0, :, :5])


def test_a_pass_fills_every_input_in_one_buffer_and_spare_rows_write_into_scratch():
    """One buffer holds every integer input (on a GPU: one asynchronous copy per pass, no sync per tensor);
    rows beyond the batch, and a run before any fill, have no queries and write only into the scratch slot."""
    model = random_model("llada", seed=3)
    runner = ModelRunner(model, slots=3, max_length=32, cuda_graphs=False)
    shape = PassShape(4, 8, 24, True, 8, gather=True)
    static = StaticPass(model, runner._arena(), shape, pad_id=5)
    scratch = static.scratch
    assert (static.inputs.staged["write_slots"] == scratch).all() and not static.inputs.staged["lengths"].any()
    plans = [PassPlan([1, 2, 3], 4, True, 20, True, (4, 7)), PassPlan([9] * 8, 0, True, 8, True, (0, 8))]
    static.fill(plans, [2, 0])
    staged = static.inputs.staged
    assert staged["ids"][0].tolist() == [1, 2, 3] + [5] * 5 and staged["ids"][1].tolist() == [9] * 8
    assert staged["write_slots"][0].tolist() == [2, 2, 2] + [scratch] * 5
    assert (staged["write_slots"][2:] == scratch).all()
    assert staged["write_positions"][0, :3].tolist() == [4, 5, 6] and staged["read_slots"].tolist()[:2] == [2, 0]
    assert staged["reach"].tolist() == [20, 8, 0, 0] and staged["lengths"].tolist() == [3, 8, 0, 0]
    storage = static.inputs.device.untyped_storage().data_ptr()
    access = static.access
    for tensor in (static.inputs.views["ids"], static.inputs.views["logits_at"], access.write_slots,
                   access.write_positions, access.query_start, access.read_slots):
        assert tensor.untyped_storage().data_ptr() == storage
    static.forward()
    assert access.key_mask.sum(-1).tolist() == [20, 8, 0, 0] and static.query_mask.sum(-1).tolist() == [3, 8, 0, 0]
