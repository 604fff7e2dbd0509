"""The blocks' elementwise chains through torch.compile: the same bits as eager, so serving may fuse them."""
from __future__ import annotations

import asyncio
import random
import shutil

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.prepare import prepare_for_serving
from sinkprune.dlm import layers
from sinkprune.dlm.layers import EAGER, compiled_elementwise, set_elementwise
from tests.conftest import random_model
from tests.test_engine import final, random_requests, reference, serve

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="torch.compile on a CPU needs a C++ compiler")


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_operators_give_the_eager_bits_in_bfloat16(device):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    x, weight = randn(3, 7, 64), randn(64)
    q, k = randn(3, 7, 4, 16).transpose(1, 2), randn(3, 7, 2, 16).transpose(1, 2)  # strided, as attention has them
    cos, sin = randn(3, 1, 7, 16), randn(3, 1, 7, 16)
    gate, up = randn(3, 7, 96), randn(3, 7, 96)
    with compiled_elementwise():
        compiled = layers.ops
        assert compiled is not EAGER
        assert torch.equal(compiled.rms_norm(x, weight, 1e-5), EAGER.rms_norm(x, weight, 1e-5))
        for got, want in zip(compiled.rotary_qk(q, k, cos, sin), EAGER.rotary_qk(q, k, cos, sin)):
            assert torch.equal(got, want)
        assert torch.equal(compiled.silu_mul(gate, up), EAGER.silu_mul(gate, up))
    assert layers.ops is EAGER  # restored


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_a_model_with_compiled_operators_gives_the_same_logits(model_type):
    model = random_model(model_type, dtype=torch.bfloat16)
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        with compiled_elementwise():
            compiled = model(ids, attention_mask=mask).logits
    assert torch.equal(compiled, eager)


def test_an_engine_prepared_with_compiled_operators_decodes_as_the_eager_reference():
    """`EngineConfig.compile_elementwise` as a replica applies it: tokens equal generate() run eagerly."""
    model = random_model("llada", dtype=torch.bfloat16)
    requests = random_requests("llada", 5, 0.0, random.Random(2))
    expected = [reference(model, request, request.seed) for request in requests]
    config = EngineConfig(max_num_seqs=2, compile_elementwise=True)
    try:
        prepared = prepare_for_serving(model, config, sparse=False)
        assert prepared.summary()["compiled_elementwise"] and layers.ops is not EAGER
        events, _ = asyncio.run(serve(DLMEngine(model, None, config), requests, [0, 0, 1, 2, 3]))
    finally:
        set_elementwise(EAGER)
    assert [final(e).token_ids for e in events] == expected
