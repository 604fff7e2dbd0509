"""Attention-mass collection and the sink summary."""
from __future__ import annotations

import json

import torch

from sinkprune.sinks import collect_attention_mass, plot_mass, summarize
from tests.conftest import random_model


def test_mass_is_collected_per_timestep_layer_window():
    model = random_model("llada")
    windows = torch.randint(3, 90, (3, 10))
    windows[:, 0] = 0
    mass = collect_attention_mass(model, windows, [0.2, 0.8], batch_size=2)
    assert mass.shape == (2, 2, 3, 10)
    # every query of every head spreads probability 1 over the keys
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 2, 3), 4.0 * 10))
    assert torch.equal(mass, collect_attention_mass(model, windows, [0.2, 0.8], batch_size=3))


def test_summary_tells_a_fixed_sink_from_a_moving_one():
    steps, windows, seq = 3, 4, 16
    mass = torch.ones(steps, 2, windows, seq)
    mass[:, 0, :, 0] = 50.0  # layer 0: always the first token
    for s in range(steps):
        mass[s, 1, :, 3 + 4 * s] = 50.0  # layer 1: the sink moves with t
    report = summarize(mass, [0.2, 0.5, 0.8])
    fixed, moving = report["layers"]
    assert fixed["dominant_position_variance_norm"] == 0.0
    assert fixed["windows_where_dominant_moves"] == 0.0
    assert all(s["dominant_is_first_token"] == 1.0 for s in fixed["by_timestep"])
    assert moving["windows_where_dominant_moves"] == 1.0
    assert moving["dominant_position_variance_norm"] > 0.0
    assert [s["most_common_dominant_position"] for s in moving["by_timestep"]] == [3, 7, 11]
    share = 50 / (50 + 15)
    assert abs(fixed["by_timestep"][0]["dominant_share_mean"] - share) < 1e-6
    json.dumps(report)


def test_plot_is_written(tmp_path):
    mass = torch.rand(2, 3, 2, 12) + 0.1
    path = plot_mass(mass, [0.3, 0.7], tmp_path / "sinks.png")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
