"""CUDA graphs in the engine (skipped without CUDA): a replayed pass gives what the same pass gives eagerly."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from tests.conftest import random_model
from tests.test_engine import final, random_requests, serve
from tests.test_model_runner import dual_cache_requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_graph_replay_gives_the_tokens_of_eager_passes_at_the_same_shapes(model_type):
    model = random_model(model_type, dtype=torch.float32).to("cuda")
    requests = random_requests(model_type, 8, 0.0, random.Random(3))
    outputs = {}
    for graphs in (True, False):
        engine = DLMEngine(model, None, EngineConfig(max_num_seqs=4, max_padding_ratio=4.0, cuda_graphs=graphs))
        engine.runner.bucketed = True  # eager passes at the graphs' bucket shapes
        events, _ = asyncio.run(serve(engine, requests, [0, 0, 1, 1, 2, 3, 5, 8]))
        outputs[graphs] = [final(e).token_ids for e in events]
        if graphs:
            assert engine.runner.passes and all(p.graph is not None for p in engine.runner.passes.values())
            assert engine.runner.capture_seconds > 0
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_graphs_captured_at_start_serve_every_block_pass(model_type):
    """The warm-up captures the dual-cache block passes before any request: serving adds only the blocks'
    first (full) passes, and the tokens are those of eager passes at the same shapes."""
    model = random_model(model_type, dtype=torch.float32).to("cuda")
    requests = dual_cache_requests(6, block_length=4)
    outputs = {}
    for graphs in (True, False):
        config = EngineConfig(max_num_seqs=3, max_padding_ratio=64.0, max_model_len=48, cuda_graphs=graphs,
                              capture_block_lengths=(4,))
        engine = DLMEngine(model, None, config)
        engine.runner.bucketed = True
        at_start = set(engine.runner.passes)
        events, _ = asyncio.run(serve(engine, requests, [0, 0, 0, 1, 2, 2]))
        outputs[graphs] = [final(e).token_ids for e in events]
        if graphs:
            report = engine.runner.stats()["captured_at_start"]
            assert at_start == set(engine.runner.block_pass_shapes((4,))) and report["passes"] == len(at_start)
            assert report["seconds"] > 0 and report["memory_bytes"] >= 0
            assert all(s.write and not s.context for s in set(engine.runner.passes) - at_start)
    assert outputs[True] == outputs[False]
