"""Our cuSPARSELt backend's logic on CPU: where it looks for the library, when it is offered, and how a
layer pads M, shares plans and adds the bias (a stand-in extension does the product; the real one runs in
tests/test_kernels_cuda.py on a GPU)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sinkkernels import cusparselt
from sinkkernels.testing import random_24_weight


def test_finds_header_and_library_under_cusparselt_path(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "include" / "cusparseLt.h").write_text("")
    (tmp_path / "lib" / "libcusparseLt.so.0").write_text("")
    monkeypatch.setenv(cusparselt.ENV_PATH, str(tmp_path))
    assert cusparselt.find_library() == (tmp_path / "include", tmp_path / "lib" / "libcusparseLt.so.0")


def test_names_where_it_looked_when_the_library_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(cusparselt, "_roots", lambda: [tmp_path])
    reason = cusparselt.find_library()
    assert isinstance(reason, str) and "cusparseLt.h" in reason and cusparselt.ENV_PATH in reason


def test_not_offered_on_cpu_or_for_other_dtypes_or_shapes(monkeypatch):
    assert "needs a CUDA GPU" in cusparselt.unavailable_reason(torch.device("cpu"), torch.bfloat16, 64, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    assert "float16 or bfloat16" in cusparselt.unavailable_reason(cuda, torch.float32, 64, 64)
    assert "multiples of 16" in cusparselt.unavailable_reason(cuda, torch.bfloat16, 40, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0+" in cusparselt.unavailable_reason(cuda, torch.bfloat16, 64, 64)


class _StandInPlan:
    made: list[tuple] = []

    def __init__(self, n, k, m, dtype, alg_id, device):
        self.shape, self.alg_id = (n, k, m), alg_id
        _StandInPlan.made.append((n, k, m, dtype))

    def run(self, compressed, x, out):
        assert x.is_contiguous() and out.is_contiguous() and (*compressed.shape, x.shape[0]) == self.shape
        out.copy_(x @ compressed.T)


class _StandInExtension:
    Plan = _StandInPlan

    @staticmethod
    def version():
        return "0.8.0"

    @staticmethod
    def compress(weight):
        return weight.clone()


def test_layer_pads_m_to_16_shares_plans_and_adds_bias(monkeypatch):
    monkeypatch.setattr(cusparselt, "extension", lambda: _StandInExtension)
    monkeypatch.setattr(cusparselt, "_PLANS", {})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _StandInPlan.made.clear()
    weight, bias = random_24_weight(32, 64, seed=2), torch.randn(32)
    layers = [cusparselt.CusparseLtWeight(weight) for _ in range(2)]
    for layer in layers:
        for m in (1, 16, 17):
            x = torch.randn(m, 64)
            torch.testing.assert_close(layer(x, bias), x @ weight.T + bias)
    assert _StandInPlan.made == [(32, 64, 16, "float32"), (32, 64, 32, "float32")]


def test_a_plan_is_never_made_inside_a_graph_capture(monkeypatch):
    monkeypatch.setattr(cusparselt, "_PLANS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA graph capture"):
        cusparselt.plan(32, 64, 16, torch.bfloat16, torch.device("cpu"))


def test_bf16_plans_take_the_surveyed_algorithm_for_their_shape(tmp_path, monkeypatch):
    table = tmp_path / "algs.json"
    table.write_text(json.dumps({"device": "NVIDIA H200", "cusparselt": "0.8.0", "algorithms": {"32,64,16": 2}}))
    monkeypatch.setenv(cusparselt.ENV_ALGORITHMS, str(table))
    monkeypatch.setattr(cusparselt, "extension", lambda: _StandInExtension)
    monkeypatch.setattr(cusparselt, "_PLANS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cusparselt.algorithm_table.cache_clear()
    try:
        plans = [cusparselt.plan(32, 64, m, dtype, torch.device("cpu"))
                 for m, dtype in ((16, torch.bfloat16), (32, torch.bfloat16), (16, torch.float16))]
    finally:
        cusparselt.algorithm_table.cache_clear()
    assert [plan.alg_id for plan in plans] == [2, 0, 0]  # the table's id; no entry; the survey measured bf16 only
