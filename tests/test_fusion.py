"""q/k/v and gate/up fused for serving: the same outputs, the weights held once, packed 2:4 rows stacked
without unpacking, and the engine serving a fused model token for token as the reference loop does."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch
from torch import nn

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.prepare import prepare_for_serving
from sinkkernels.formats import pack, unpack
from sinkkernels.sparse24 import Packed24Linear, Sparse24Linear
from sinkkernels.testing import random_24_weight
from sinkkernels.timing import count_launches
from sinkprune.dlm.fusion import fuse_projections, stack_linears
from sinkprune.dlm.layers import FusedLinear
from tests.conftest import random_model
from tests.test_engine import final, random_requests, reference, serve


def test_fused_model_gives_the_same_logits_with_the_weights_held_once(model_type):
    model = random_model(model_type)
    ids = torch.randint(0, 90, (3, 11))
    with torch.inference_mode():
        before = model(ids).logits
        params = sum(p.numel() for p in model.parameters())
        names = fuse_projections(model)
        after = model(ids).logits
    assert len(names) == 2 * len(model.blocks)  # one q/k/v and one gate/up per block
    assert all(isinstance(model.get_submodule(name), FusedLinear) for name in names)
    assert sum(p.numel() for p in model.parameters()) == params  # stacked, not copied
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not linear_names & {"q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "ff_proj"}
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    assert fuse_projections(model) == []  # a second call finds everything fused


def test_fusing_saves_three_launches_per_block():
    model = random_model("llada")
    ids = torch.randint(0, 90, (2, 9))
    with torch.inference_mode():
        separate = count_launches(lambda: model(ids), torch.device("cpu"))
        fuse_projections(model)
        fused = count_launches(lambda: model(ids), torch.device("cpu"))
    assert separate - fused == 3 * len(model.blocks)


def test_packed_2_4_rows_stack_into_one_layer():
    weights = [random_24_weight(rows, 32, seed=rows) for rows in (16, 8, 8)]
    biases = [torch.randn(16), None, torch.randn(8)]
    layers = [Sparse24Linear.from_dense(w, b, backend="dense") for w, b in zip(weights, biases)]
    stacked = stack_linears(layers, "qkv")
    assert isinstance(stacked, Sparse24Linear) and (stacked.out_features, stacked.in_features) == (32, 32)
    torch.testing.assert_close(stacked.dense_weight(), torch.cat(weights), rtol=0, atol=0)
    x = torch.randn(5, 32)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(stacked(x), expected, rtol=1e-6, atol=1e-6)


def test_layers_loaded_packed_stack_packed_and_one_beside_plain_ones_is_unpacked():
    weights = [random_24_weight(rows, 32, seed=rows) for rows in (16, 8)]
    packed = [Packed24Linear(*pack(weight), name=f"p{i}") for i, weight in enumerate(weights)]
    stacked = stack_linears(packed, "qkv")
    assert type(stacked) is Packed24Linear and (stacked.out_features, stacked.in_features) == (24, 32)
    torch.testing.assert_close(unpack(stacked.values, stacked.meta), torch.cat(weights), rtol=0, atol=0)
    plain = nn.Linear(32, 8, bias=False)
    mixed = stack_linears([packed[0], plain], "gate_up")  # a checkpoint that compressed only one of them
    assert type(mixed) is nn.Linear and mixed.bias is None
    torch.testing.assert_close(mixed.weight, torch.cat([weights[0], plain.weight]), rtol=0, atol=0)


def test_what_cannot_be_fused_is_refused_by_name():
    dense, packed = nn.Linear(32, 8), Sparse24Linear.from_dense(random_24_weight(8, 32), backend="dense")
    with pytest.raises(ValueError, match="blocks.0.qkv_proj: cannot fuse Linear, Sparse24Linear"):
        stack_linears([dense, packed], "blocks.0.qkv_proj")
    with pytest.raises(ValueError, match="mlp: linears of different input sizes"):
        stack_linears([nn.Linear(32, 8), nn.Linear(16, 8)], "mlp")
    with pytest.raises(ValueError, match="different input sizes"):
        stack_linears([packed, Sparse24Linear.from_dense(random_24_weight(8, 16), backend="dense")], "x")


@pytest.mark.parametrize("fuse", [True, False])
def test_engine_on_a_prepared_model_equals_generate_alone(model_type, fuse):
    """What a replica serves (prepare_for_serving, fused or not) decodes as the reference loop does
    on the model before any fusion, cached and uncached requests mixed."""
    original = random_model(model_type)
    model = random_model(model_type)
    config = EngineConfig(max_num_seqs=4, max_padding_ratio=4.0, fuse_projections=fuse)
    prepared = prepare_for_serving(model, config, sparse=False)
    assert len(prepared.fused) == (2 * len(model.blocks) if fuse else 0)
    assert prepared.summary()["fused_projections"] == len(prepared.fused)
    requests = random_requests(model_type, 8, 0.0, random.Random(5))
    events, _ = asyncio.run(serve(DLMEngine(model, None, config), requests, [0] * len(requests)))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(original, request, request.seed), request


def test_prepared_sparse_layers_report_the_bytes_they_hold(monkeypatch):
    """The replica's preparation with a sparse backend (Triton under the interpreter on the CPU): fused
    layers swapped, and the bytes held against the dense weights' reported."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = random_model("llada", dtype=torch.float32)
    with torch.no_grad():
        for module in model.blocks.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(random_24_weight(*module.weight.shape, seed=module.in_features))
    prepared = prepare_for_serving(model, EngineConfig(max_num_seqs=2, max_tokens_per_step=64), sparse=True,
                                   backend="triton")
    assert len(prepared.swapped) == 4 * len(model.blocks)  # q/k/v, o, gate/up, down
    assert any(name.endswith("qkv_proj.linear") for name in prepared.swapped)
    summary = prepared.summary()
    # fp32 values (half the dense bytes) + 4 bits of metadata per group of 4: 17/32 of dense
    assert summary["sparse_weight_bytes_held_vs_dense"] == pytest.approx(17 / 32, abs=1e-4)
