"""The runner's static-buffer path on CPU: the same code a GPU captures as CUDA graphs, run eagerly.

With `bucketed` set, every pass runs at its bucket's shape (padding rows, queries and context
positions, buffers kept and refilled across steps, stale rows left in them), exactly as graphs
replay it; outputs must still equal `generate()` on each request alone.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.model_runner import PassShape, bucket
from tests.conftest import random_model
from tests.test_engine import final, random_requests, reference, serve


def test_buckets_round_shapes_up_within_the_limits():
    assert bucket(PassShape(3, 32, 100, False), 8, 512) == PassShape(4, 32, 128, False)
    assert bucket(PassShape(5, 33, 0, True), 8, 512) == PassShape(8, 48, 0, True)
    assert bucket(PassShape(7, 200, 500, False), 6, 512) == PassShape(6, 256, 512, False)
    assert bucket(PassShape(1, 700, 0, True), 4, 640) == PassShape(1, 640, 0, True)


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

    def recording(batch):
        slots = [seq.slot for seq in engine.scheduler.running]
        assert None not in slots and len(set(slots)) == len(slots)
        seen.append(set(slots))
        return original(batch)

    engine.runner.step = recording
    events, _ = asyncio.run(serve(engine, requests, [0] * len(requests)))
    assert all(final(e).finish_reason in ("stop", "length") for e in events)
    assert set().union(*seen) == {0, 1}
