"""The Monte-Carlo likelihood estimator and paired comparisons."""
from __future__ import annotations

import math

import torch

from sinkprune.dlm.likelihood import estimate_nll, paired_difference, sample_masks
from sinkprune.dlm.model import DLMOutput
from tests.conftest import VOCAB, random_model


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its true NLL is exactly log V per token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None):
        return DLMOutput(torch.zeros(*ids.shape, self.config.vocab_size))


def test_masks_are_stratified_and_spare_bos():
    masks = sample_masks(33, 8, torch.Generator().manual_seed(0), scored_from=1)
    counts = masks.sum(-1)
    assert not masks[:, 0].any()
    assert ((counts >= 1) & (counts <= 32)).all()
    # counts spread over the range (one per stratum of width L/samples), not clustered
    assert len(set(counts.tolist())) == 8
    assert torch.equal(masks, sample_masks(33, 8, torch.Generator().manual_seed(0), scored_from=1))


def test_uniform_model_scores_exactly_log_vocab():
    model = UniformModel(random_model("llada").config)
    seqs = torch.randint(0, VOCAB, (3, 20))
    result = estimate_nll(model, seqs, samples=5, batch_size=2)
    torch.testing.assert_close(result.nll_per_token, torch.full((3,), math.log(VOCAB)), rtol=1e-5, atol=1e-5)
    assert abs(result.perplexity - VOCAB) < 1e-2


def test_same_seed_same_masks_pairs_exactly():
    model = random_model("llada", dtype=torch.float32)
    seqs = torch.randint(0, 90, (6, 24), generator=torch.Generator().manual_seed(2))
    a = estimate_nll(model, seqs, samples=4, seed=7, batch_size=3)
    b = estimate_nll(model, seqs, samples=4, seed=7, batch_size=4)
    torch.testing.assert_close(a.nll_per_token, b.nll_per_token)
    assert paired_difference(a, b).mean == 0.0
    assert estimate_nll(model, seqs, samples=4, seed=8).mean != a.mean


def test_paired_difference_is_less_noisy_than_either_estimate():
    model = random_model("llada", dtype=torch.float32)
    perturbed = random_model("llada", dtype=torch.float32)
    with torch.no_grad():
        for p, q in zip(model.parameters(), perturbed.parameters()):
            q.copy_(p + 0.01 * torch.randn_like(p))
    seqs = torch.randint(0, 90, (12, 24), generator=torch.Generator().manual_seed(3))
    a = estimate_nll(model, seqs, samples=4, seed=1)
    b = estimate_nll(perturbed, seqs, samples=4, seed=1)
    diff = paired_difference(a, b)
    assert diff.stderr < 0.5 * min(a.stderr, b.stderr)
    assert abs(diff.mean - (b.mean - a.mean)) < 1e-5
