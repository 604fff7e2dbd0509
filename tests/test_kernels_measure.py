"""The measured dispatch on CPU: which M it times, how it picks, that it caches per device and M values,
and that a swap follows the measured plan. (On a GPU the same code times real kernels at replica start.)"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sinkkernels import dispatch, measure
from sinkkernels.dispatch import TABLE_FORMAT, fastest_steps, single_representation_steps, table_key
from sinkkernels.swap import sparse_shapes, swap_sparse_linears
from sinkkernels.testing import random_24_weight


def test_engine_m_values_cover_block_passes_and_full_passes():
    assert measure.engine_m_values(8, 1024) == [32, 64, 128, 256, 512, 1024]
    assert measure.engine_m_values(6, 300, block_length=16) == [16, 32, 64, 96, 128, 256]
    assert measure.engine_m_values(1, 64) == [32, 64]


def test_a_sparse_backend_must_beat_dense_by_the_margin():
    times = {32: {"dense": 1.00, "triton": 0.99}, 1024: {"dense": 1.0, "cusparselt": 0.90},
             4096: {"dense": 1.0, "cusparselt": 0.98}}
    assert fastest_steps(times, dense_margin=0.03) == [[32, "dense"], [1024, "cusparselt"], [None, "dense"]]
    assert fastest_steps(times) == [[32, "triton"], [None, "cusparselt"]]


def test_compact_plans_hold_one_form_of_the_weight_and_are_never_slower_than_dense():
    # the H200 case: cuSPARSELt ahead only at mid M, behind at small M -> a mixed plan would hold both forms
    mixed = {32: {"dense": 1.0, "cusparselt": 1.6}, 1024: {"dense": 1.0, "cusparselt": 0.9},
             4096: {"dense": 1.0, "cusparselt": 1.01}}
    assert fastest_steps(mixed, 0.03) == [[32, "dense"], [1024, "cusparselt"], [None, "dense"]]
    assert single_representation_steps(mixed, 0.03) == [[None, "dense"]]
    # never slower anywhere and 10% faster in total: the sparse backend alone, the fastest such one
    ahead = {32: {"dense": 1.0, "triton": 0.8, "cusparselt": 1.0}, 1024: {"dense": 1.0, "triton": 1.0,
                                                                             "cusparselt": 0.7}}
    assert single_representation_steps(ahead, 0.03) == [[None, "cusparselt"]]
    assert single_representation_steps({**ahead, 4096: {"dense": 1.0, "triton": 0.5, "cusparselt": 0.9}},
                                       0.03) == [[None, "triton"]]
    # a backend slower than dense at one M is out, however fast elsewhere
    assert single_representation_steps({**ahead, 64: {"dense": 1.0, "triton": 0.9, "cusparselt": 1.2}},
                                       0.03) == [[None, "triton"]]
    # never slower but within the margin in total: dense
    assert single_representation_steps({32: {"dense": 1.0, "triton": 0.99}}, 0.03) == [[None, "dense"]]


def test_the_cache_is_kept_per_policy(tmp_path, interpreter):
    timer = FakeTimer({"dense": 2.0, "triton": 1.0})
    shape = {(32, 64)}
    compact = measure.measured_table(shape, torch.float32, "cpu", [1, 8], timer=timer, cache_dir=tmp_path)
    assert timer.calls == 4 and list(compact.plans.values()) == [[[None, "triton"]]]
    fastest = measure.measured_table(shape, torch.float32, "cpu", [1, 8], timer=timer, cache_dir=tmp_path,
                                     policy="fastest")
    assert fastest.measured and timer.calls == 8  # a plan made under another policy is measured again
    assert compact.summary()["policy"] == "compact" and fastest.summary()["policy"] == "fastest"
    assert json.loads(fastest.path.read_text())["policies"] == {table_key("cpu", torch.float32, 32, 64): "fastest"}
    with pytest.raises(ValueError, match="unknown dispatch policy 'smallest'"):
        measure.measured_table(shape, torch.float32, "cpu", [1], timer=timer, cache_dir=tmp_path, policy="smallest")


class FakeTimer:
    """Times by backend name (the mechanism under test, not the machine's noise); counts the calls."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, 0

    def __call__(self, fn, warmup, reps):
        self.calls += 1
        layer = fn.__defaults__[0]  # measure_shape binds each backend's layer as a default argument
        fn()  # the call must run
        return self.seconds[layer.plan.backends[0]]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)


def test_measured_table_times_usable_backends_and_caches_per_m_values(tmp_path, interpreter):
    timer = FakeTimer({"dense": 2.0, "triton": 1.0})
    shapes = {(32, 64), (16, 32)}
    first = measure.measured_table(shapes, torch.float32, "cpu", [1, 8], timer=timer, cache_dir=tmp_path)
    keys = sorted(table_key("cpu", torch.float32, n, k) for n, k in shapes)
    assert first.plans == {key: [[None, "triton"]] for key in keys}
    assert sorted(first.measured) == keys and timer.calls == 2 * 2 * 2  # shapes x M values x backends
    stored = json.loads(first.path.read_text())
    assert stored["format"] == TABLE_FORMAT and stored["m_values"] == {key: [1, 8] for key in keys}
    assert first.path.parent == tmp_path and "torch" in first.path.name

    again = measure.measured_table(shapes, torch.float32, "cpu", [8, 1], timer=timer, cache_dir=tmp_path)
    assert again.plans == first.plans and again.measured == [] and timer.calls == 8  # read back, not timed

    other_m = measure.measured_table({(32, 64)}, torch.float32, "cpu", [1, 8, 64], timer=timer, cache_dir=tmp_path)
    assert other_m.measured == [table_key("cpu", torch.float32, 32, 64)] and timer.calls == 8 + 3 * 2
    assert set(json.loads(first.path.read_text())["plans"]) == set(keys)  # the other shape's plan is kept


def test_measure_shape_times_real_calls_and_skips_unusable_backends(interpreter):
    times = measure.measure_shape(32, 64, torch.float32, torch.device("cpu"), [3], reps=1, warmup=0)
    assert set(times[3]) == {"dense", "triton"}  # cusparselt and cutlass cannot run on CPU
    assert all(seconds > 0 for seconds in times[3].values())


def test_swap_follows_a_measured_table(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight.copy_(random_24_weight(32, 64, seed=1))
        model[1].weight.copy_(random_24_weight(16, 32, seed=2))
    assert sparse_shapes(model) == {(32, 64), (16, 32)}
    seen = []

    def recording_plan_for(device, dtype, out_features, in_features, backend=None, table=None):
        seen.append(table)
        return dispatch.single("dense")

    monkeypatch.setattr("sinkkernels.swap.plan_for", recording_plan_for)
    monkeypatch.setattr("sinkkernels.sparse24.plan_for", recording_plan_for)
    table = {"cpu|float32|32x64": [[None, "dense"]]}
    assert swap_sparse_linears(model, table=table) == ["0", "1"]
    assert seen and all(t is table for t in seen)


def test_dispatch_measured_under_other_cusparselt_algorithms_is_never_reused(tmp_path, monkeypatch):
    from sinkkernels import cusparselt
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.delenv(cusparselt.ENV_ALGORITHMS, raising=False)
    cusparselt.algorithm_table.cache_clear()
    plain = measure.cache_path(cuda, tmp_path)
    tables = []
    for ids in ({"4096,4096,256": 2}, {"4096,4096,256": 3}):
        path = tmp_path / f"algs{len(tables)}.json"
        path.write_text(json.dumps({"device": "NVIDIA H200", "cusparselt": "0.8.0", "algorithms": ids}))
        monkeypatch.setenv(cusparselt.ENV_ALGORITHMS, str(path))
        cusparselt.algorithm_table.cache_clear()
        tables.append(measure.cache_path(cuda, tmp_path))
    cusparselt.algorithm_table.cache_clear()
    assert len({plain, *tables}) == 3 and all(p.parent == tmp_path for p in tables)
    assert plain.name == "NVIDIA-H200-torch" + torch.__version__ + ".json"
    assert measure.MeasuredTable({}, plain, [], 0.0).summary()["cusparselt_algorithms"] == str(path)
