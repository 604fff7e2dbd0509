"""Calibration options: clean or noised inputs, per-timestep sink weighting, where the
hidden states live, shared statistics, the calibration dtype."""
from __future__ import annotations

import pytest
import torch

from sinkprune import compute_dtype
from sinkprune.calibration import InputSquareSum, calibrate_sequentially, prunable_linears
from sinkprune.hidden_store import HiddenStates
from sinkprune.prune import PruneSettings, check_settings, prune_model, sample_row_weights
from tests.conftest import random_model


def _windows(count: int = 4, seq: int = 16) -> torch.Tensor:
    windows = torch.randint(3, 90, (count, seq), generator=torch.Generator().manual_seed(3))
    windows[:, 0] = 0
    return windows


def _pruned(settings: PruneSettings, **kwargs) -> dict[str, torch.Tensor]:
    model = random_model("llada", dtype=torch.float32)
    prune_model(model, settings, _windows(), **kwargs)
    return model.state_dict()


@pytest.mark.parametrize("method", ["sink-wanda", "sparsegpt"])
@pytest.mark.parametrize("place", ["host", "disk"])
def test_hidden_states_on_host_or_disk_prune_exactly_as_in_device_memory(tmp_path, method, place):
    settings = PruneSettings(method, "2:4", [0.3, 0.7], batch_size=3)
    expected = _pruned(settings)
    got = _pruned(settings, hidden_states=place, hidden_dir=str(tmp_path))
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert list(tmp_path.iterdir()) == []  # the disk file is gone afterwards


def test_disk_slots_round_trip_bf16_and_refuse_another_shape(tmp_path):
    with HiddenStates("disk", torch.device("cpu"), torch.bfloat16, tmp_path) as store:
        first, second = torch.randn(2, 5, 8).bfloat16(), torch.randn(1, 5, 8).bfloat16()
        store.append(first)
        store.append(second)
        store[0] = first * 2
        assert torch.equal(store[0], first * 2) and torch.equal(store[1], second)
        with pytest.raises(ValueError, match="batch 1"):
            store[1] = first


def test_clean_calibration_ignores_the_timestep_grid_and_differs_from_noised():
    clean_a = _pruned(PruneSettings("wanda", "2:4", [0.9], calibration="clean"))
    clean_b = _pruned(PruneSettings("wanda", "2:4", [0.2, 0.5], calibration="clean"))
    noised = _pruned(PruneSettings("wanda", "2:4", [0.9], calibration="noised"))
    assert all(torch.equal(clean_a[n], clean_b[n]) for n in clean_a)
    assert any(not torch.equal(clean_a[n], noised[n]) for n in clean_a)


def test_row_weights_follow_the_sample_order_of_each_mode():
    scores = torch.rand(3, 2, 5)  # (timesteps, windows, seq)
    timesteps = [0.9, 0.5, 0.1]
    per_step = sample_row_weights(scores, PruneSettings("sink-wanda", "2:4", timesteps, calibration="noised",
                                                        sink_weighting="per-timestep"))
    assert torch.equal(per_step, 1 - scores.flatten(0, 1))  # noised samples are timestep-major
    mean = sample_row_weights(scores, PruneSettings("sink-wanda", "2:4", timesteps, calibration="noised"))
    assert torch.allclose(mean, (1 - scores.mean(0)).repeat(3, 1))
    clean = sample_row_weights(scores, PruneSettings("sink-wanda", "2:4", timesteps, calibration="clean"))
    assert torch.allclose(clean, 1 - scores.mean(0))


def test_per_timestep_weighting_equals_mean_when_scores_do_not_move_and_differs_when_they_do():
    timesteps = [0.8, 0.3]
    still = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    moving = torch.stack([still, still.flip(-1)])

    def run(weighting, scores):
        return _pruned(PruneSettings("sink-wanda", "2:4", timesteps, calibration="noised", sink_weighting=weighting),
                       sink_scores=scores)

    mean, per_step = run("mean", still), run("per-timestep", still.expand(2, 4, 16))
    assert all(torch.equal(mean[n], per_step[n]) for n in mean)
    moved = run("per-timestep", moving)
    assert any(not torch.equal(moved[n], run("mean", moving)[n]) for n in moved)


def test_auto_calibration_is_the_measured_better_one_per_method():
    assert PruneSettings("sink-wanda", "2:4").calibration == "clean"
    assert PruneSettings("wanda", "2:4").calibration == "clean"
    assert PruneSettings("sparsegpt", "2:4").calibration == "noised"
    assert PruneSettings("sink-sparsegpt", "2:4").calibration == "noised"
    assert PruneSettings("sink-wanda", "2:4", sink_weighting="per-timestep").calibration == "noised"
    assert PruneSettings("wanda", "2:4", calibration="noised").calibration == "noised"


def test_per_timestep_weighting_needs_noised_calibration():
    with pytest.raises(ValueError, match="noised"):
        check_settings(PruneSettings("sink-wanda", "2:4", calibration="clean", sink_weighting="per-timestep"))
    with pytest.raises(ValueError, match="calibration"):
        check_settings(PruneSettings("wanda", "2:4", calibration="dirty"))


def test_shared_inputs_share_one_statistic_equal_to_each_linears_own_sum():
    model = random_model("llada", dtype=torch.float32)
    windows = _windows()
    block = model.blocks[0]
    expected: dict[str, torch.Tensor] = {}
    hooks = [linear.register_forward_hook(
        lambda _m, args, _o, name=name: expected.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)))
        for name, linear in prunable_linears(block).items()]
    block(model.embed(windows), model.attention_inputs(windows))
    for hook in hooks:
        hook.remove()
    got = {}

    def keep_first(index, _block, stats):
        if index == 0:
            got.update(stats)

    calibrate_sequentially(model, windows, "input_square_sum", keep_first, batch_size=len(windows))
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].value.float(), value, rtol=1e-5, atol=1e-4)
    assert len({id(stat) for stat in got.values()}) == 4  # attention input, o input, MLP input, down input
    assert all(isinstance(stat, InputSquareSum) for stat in got.values())


def test_the_last_block_is_not_run_again_after_pruning():
    model = random_model("llada", dtype=torch.float32)
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    calibrate_sequentially(model, _windows(4), "input_square_sum", lambda *_: None, batch_size=2)
    assert calls == [4] * (len(calls) - 1) + [2]  # 2 batches: gather + propagate, the last only gathers


def test_calibration_dtype_takes_the_faster_of_the_stored_half_dtype_and_float32(monkeypatch):
    rates = {torch.bfloat16: 9e9, torch.float32: 70e9}
    monkeypatch.setattr(compute_dtype, "matmul_rate", lambda _device, dtype: rates[dtype])
    assert compute_dtype.calibration_dtype("cpu", torch.bfloat16) == torch.float32  # emulated bf16 (AVX2 only)
    rates[torch.bfloat16] = 500e9
    assert compute_dtype.calibration_dtype("cpu", torch.bfloat16) == torch.bfloat16  # AMX
    assert compute_dtype.calibration_dtype("cpu", torch.float32) == torch.float32  # never below the stored precision


def test_matmul_rate_is_a_plausible_flop_rate():
    rate = compute_dtype.matmul_rate("cpu", torch.float32, rows=64, features=128)
    assert 1e7 < rate < 1e14
