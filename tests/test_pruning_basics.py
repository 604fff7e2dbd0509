"""Patterns, masks and the magnitude / Wanda scores."""
from __future__ import annotations

import pytest
import torch

from sinkprune.calibration import default_timesteps, input_square_sums, prunable_linears
from sinkprune.masks import follows_pattern, make_mask, parse_pattern
from sinkprune.prune import prune_model
from sinkprune.scores import wanda_score
from tests.conftest import random_model


def test_parse_pattern():
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern("unstructured:0.3").sparsity == 0.3
    for bad in ("4:2", "unstructured:1.5", "half"):
        with pytest.raises(ValueError, match="pattern|unstructured"):
            parse_pattern(bad)


def test_nm_mask_keeps_the_top_n_of_every_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    mask = make_mask(scores, parse_pattern("2:4"))
    assert mask.tolist() == [[False, True, True, False, True, False, True, False]]
    assert follows_pattern(torch.randn(8, 16) * make_mask(torch.rand(8, 16), parse_pattern("2:4")), parse_pattern("2:4"))
    assert not follows_pattern(torch.ones(2, 8), parse_pattern("2:4"))


def test_unstructured_mask_prunes_each_row_by_ratio():
    scores = torch.rand(6, 40)
    mask = make_mask(scores, parse_pattern("unstructured:0.25"))
    assert (mask.sum(1) == 30).all()
    # the dropped ones are each row's lowest
    for row in range(6):
        assert scores[row][~mask[row]].max() <= scores[row][mask[row]].min()


def test_wanda_prefers_weights_on_loud_inputs():
    weight = torch.ones(1, 4)
    norms = torch.tensor([1.0, 100.0, 4.0, 9.0])
    keep = make_mask(wanda_score(weight, norms), parse_pattern("2:4"))
    assert keep.tolist() == [[False, True, False, True]]


def test_prune_model_hits_the_pattern_everywhere(model_type):
    model = random_model(model_type, dtype=torch.float32)
    windows = torch.randint(3, 90, (4, 16))
    sums = input_square_sums(model, windows, default_timesteps()[:3])
    assert set(sums) == set(prunable_linears(model))
    sparsity = prune_model(model, "wanda", parse_pattern("2:4"), sums)
    assert len(sparsity) == 7 * model.config.num_layers
    for name, linear in prunable_linears(model).items():
        assert follows_pattern(linear.weight, parse_pattern("2:4")), name
        assert abs(sparsity[name] - 0.5) < 1e-6


def test_default_timesteps_are_the_papers():
    assert default_timesteps() == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
