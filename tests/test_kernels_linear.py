"""Sparse24Linear (dense backend, the CPU path) and the backend dispatch rule."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sinkkernels import dispatch, formats
from sinkkernels.dispatch import BackendUnavailable, Plan, plan_for
from sinkkernels.sparse24 import Sparse24Linear
from sinkkernels.testing import random_24_weight


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)


def linear_24(n: int, k: int, bias: bool, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    linear = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(random_24_weight(n, k, dtype, seed=seed))
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_backend_equals_nn_linear(dtype, bias):
    linear = linear_24(24, 32, bias, dtype)
    layer = Sparse24Linear.from_dense(linear.weight, linear.bias)
    assert layer.plan.backends == ("dense",)
    x = torch.randn(2, 5, 32, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.dense_weight(), linear.weight.detach())


def test_from_bitmask_equals_from_dense():
    linear = linear_24(16, 24, bias=True)
    compressed, bitmask, shape = formats.to_bitmask(linear.weight.detach())
    loaded = Sparse24Linear.from_bitmask(compressed, bitmask, shape, linear.bias.detach())
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), linear(x))


def test_state_dict_round_trip_rebuilds_the_backend_weights():
    source = Sparse24Linear.from_dense(random_24_weight(8, 16, seed=1), torch.randn(8))
    target = Sparse24Linear.from_dense(random_24_weight(8, 16, seed=2), torch.randn(8))
    assert set(source.state_dict()) == {"values", "meta", "bias"}
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(target(x), source(x))


def test_dtype_change_rebuilds_the_backend_weights():
    weight, bias = random_24_weight(8, 16, seed=3), torch.randn(8)
    layer = Sparse24Linear.from_dense(weight, bias).double()
    assert layer.values.dtype == torch.float64 and layer.meta.dtype == torch.uint8
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight.double(), bias.double()))


def test_wrong_inputs_raise_clear_errors():
    weight = random_24_weight(8, 16)
    layer = Sparse24Linear.from_dense(weight, name="mlp.up.weight")
    with pytest.raises(ValueError, match=r"mlp\.up\.weight: expected input \(\.\.\., 16\) torch\.float32"):
        layer(torch.randn(2, 12))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must be"):
        Sparse24Linear.from_dense(weight, torch.randn(4))
    dense = weight.clone()
    dense[3, :4] = 1.0
    with pytest.raises(ValueError, match=r"q\.weight is not 2:4 sparse: row 3, group 0"):
        Sparse24Linear.from_dense(dense, name="q.weight")


def test_default_plan_on_cpu_is_dense():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert plan_for("cpu", dtype, 4096, 4096) == Plan(((None, "dense"),))


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_cuda_backend_on_cpu_errors_clearly(backend, monkeypatch):
    with pytest.raises(BackendUnavailable, match=f"the {backend} backend needs a CUDA GPU.*use backend 'dense'"):
        Sparse24Linear.from_dense(random_24_weight(16, 64, torch.float16), backend=backend)
    monkeypatch.setenv(dispatch.ENV_BACKEND, backend)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        Sparse24Linear.from_dense(random_24_weight(16, 64, torch.float16))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        plan_for("cpu", torch.float16, 64, 64, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plan_for("cpu", torch.float16, 64, 64, backend="triton").backends == ("triton",)


def test_environment_forces_a_backend_and_the_argument_wins(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "Triton")
    assert plan_for("cpu", torch.float16, 64, 64).backends == ("triton",)
    assert plan_for("cpu", torch.float16, 64, 64, backend="dense").backends == ("dense",)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "auto")
    assert plan_for("cpu", torch.float16, 64, 64).backends == ("dense",)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cusparse")
    with pytest.raises(ValueError, match="SINKSERVE_SPARSE_BACKEND='cusparse' is not a sparse backend"):
        plan_for("cpu", torch.float16, 64, 64)
    with pytest.raises(ValueError, match="backend argument='fast' is not a sparse backend"):
        plan_for("cpu", torch.float16, 64, 64, backend="fast")


def test_plan_picks_the_backend_by_m():
    plan = Plan(((64, "triton"), (1024, "dense"), (None, "cusparselt")))
    assert [plan.backend_for(m) for m in (1, 64, 65, 1024, 1025, 10 ** 6)] == \
        ["triton", "triton", "dense", "dense", "cusparselt", "cusparselt"]
    assert plan.backends == ("triton", "dense", "cusparselt")


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="unknown sparse backend 'magic'"):
        dispatch.unavailable_reason("magic", torch.device("cpu"), torch.float16, 16, 16)


def test_dispatch_table_is_read_from_the_benchmark_file(tmp_path, monkeypatch):
    key = dispatch.table_key("NVIDIA H100 80GB HBM3", torch.bfloat16, 4096, 4096)
    assert key == "NVIDIA H100 80GB HBM3|bfloat16|4096x4096"
    path = tmp_path / "table.json"
    monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
    assert dispatch.load_table() == {}
    path.write_text(json.dumps({"format": dispatch.TABLE_FORMAT, "plans": {key: [[16, "triton"], [None, "dense"]]}}))
    assert dispatch.load_table() == {key: [[16, "triton"], [None, "dense"]]}
    path.write_text(json.dumps({"plans": {}}))
    with pytest.raises(ValueError, match="not a sparse dispatch table"):
        dispatch.load_table()


def test_cutlass_wrapper_pads_m_adds_bias_and_converts_once(monkeypatch):
    """The CUTLASS wrapper's own logic, on CPU: a stand-in conversion returns the dense weight."""
    from torch.sparse import SparseSemiStructuredTensor

    calls = []

    def fake_convert(weight):
        calls.append(SparseSemiStructuredTensor._FORCE_CUTLASS)
        return weight

    shapes = []
    real_linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        shapes.append((tuple(x.shape), bias is None))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_convert)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda *args: None)
    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    weight, bias = random_24_weight(32, 64, seed=4), torch.randn(32)
    layer = Sparse24Linear.from_dense(weight, bias, backend="cutlass")
    for m in (5, 8, 1):
        x = torch.randn(m, 64)
        torch.testing.assert_close(layer(x), real_linear(x, weight, bias))
    assert calls == [True] and SparseSemiStructuredTensor._FORCE_CUTLASS is False
    assert shapes == [((8, 64), True), ((8, 64), True), ((8, 64), True)]


def test_cutlass_is_never_offered_off_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reason = dispatch.unavailable_reason("cutlass", torch.device("cuda"), torch.bfloat16, 4096, 4096)
    assert "Ampere-class GPUs only" in reason and "this GPU is 9.0" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dispatch.unavailable_reason("cutlass", torch.device("cuda"), torch.bfloat16, 4096, 4096) is None


def test_dense_only_layer_is_f_linear_and_names_a_bad_input():
    weight, bias = random_24_weight(32, 64, seed=5), torch.randn(32)
    layer = Sparse24Linear.from_dense(weight, bias, backend="dense", name="mlp.up.weight")
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias))
    with pytest.raises(ValueError, match=r"mlp\.up\.weight: expected input \(\.\.\., 64\)"):
        layer(torch.randn(3, 63))


def test_a_released_layer_holds_one_form_and_refuses_what_needs_the_packed_one():
    weight, bias = random_24_weight(32, 64, seed=3), torch.randn(32)
    layer = Sparse24Linear.from_dense(weight, bias, backend="dense", name="blocks.0.down")
    x = torch.randn(5, 64)
    expected = layer(x)
    packed_bytes = layer.values.nbytes + layer.meta.nbytes
    assert layer.held_bytes() == packed_bytes + weight.nbytes  # the packed state plus the dense runner's copy
    assert layer.release_packed() and not layer.release_packed()  # once
    assert layer.held_bytes() == weight.nbytes  # what nn.Linear holds
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert "values" not in layer.state_dict() and "bias" in layer.state_dict()
    for action in (lambda: layer.to(torch.float64), layer.dense_weight,
                   lambda: Sparse24Linear.stack([layer, layer])):
        with pytest.raises(RuntimeError, match="blocks.0.down: this layer released its packed weights"):
            action()


def test_the_triton_plan_keeps_the_packed_buffers_it_reads(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = Sparse24Linear.from_dense(random_24_weight(16, 32), backend="triton")
    assert not layer.release_packed()
    assert layer.held_bytes() == layer.values.nbytes + layer.meta.nbytes  # 9/16 of dense in fp16/bf16
    assert layer.held_bytes() < random_24_weight(16, 32).nbytes * 0.6
