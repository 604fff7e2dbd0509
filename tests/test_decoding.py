"""Decoding policies and the reference generate(): LLaDA's schedule, Fast-dLLM's
threshold rule, Dream's rules, and batching invariance."""
from __future__ import annotations

import math

import pytest
import torch

from sinkprune.dlm.decoding import (
    commit_above_threshold,
    commit_top_k,
    dream_transfer_count,
    llada_transfer_counts,
    sample_tokens,
    select,
)
from sinkprune.dlm.generate import generate, model_logits, validate_schedule
from tests.conftest import MASK_ID, PAD_ID, random_model


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the input of every forward pass, to see each step's commits."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.inputs = model, []
        self.config = model.config

    @property
    def embed_weight(self):
        return self.inner.embed_weight

    def forward(self, ids, attention_mask=None):
        self.inputs.append(ids.clone())
        return self.inner(ids, attention_mask=attention_mask)


def commits_per_step(recorder: Recorder, final: torch.Tensor) -> list[torch.Tensor]:
    states = recorder.inputs + [final]
    return [((a == MASK_ID) & (b != MASK_ID)).sum(-1) for a, b in zip(states, states[1:])]


def test_llada_schedule_spreads_evenly():
    counts = llada_transfer_counts(torch.tensor([10, 3, 8]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [2, 2, 2, 2]]


@pytest.mark.parametrize("steps, gen, block", [(8, 8, 4), (6, 12, 4), (4, 8, 8)])
def test_low_confidence_commits_exactly_the_schedule(steps, gen, block):
    recorder = Recorder(random_model("llada"))
    out = generate(recorder, [[3, 4, 5]], steps=steps, gen_length=gen, block_length=block)
    per_block = steps // (gen // block)
    expected = llada_transfer_counts(torch.tensor([block]), per_block)[0].tolist() * (gen // block)
    assert [c.item() for c in commits_per_step(recorder, out.tokens)] == expected
    assert out.forward_passes == steps
    assert not (out.completions() == MASK_ID).any()


def test_blocks_are_decoded_left_to_right():
    recorder = Recorder(random_model("llada"))
    generate(recorder, [[3, 4]], steps=4, gen_length=8, block_length=4)
    second_step = recorder.inputs[1][0, 2:]
    third_step = recorder.inputs[2][0, 2:]
    assert (second_step[4:] == MASK_ID).all()  # second block untouched during the first
    assert not (third_step[:4] == MASK_ID).any()  # first block complete before the second starts


def test_committed_tokens_are_never_remasked():
    recorder = Recorder(random_model("llada"))
    out = generate(recorder, [[7, 8, 9]], steps=8, gen_length=8, block_length=8, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    states = recorder.inputs + [out.tokens]
    for before, after in zip(states, states[1:]):
        kept = before != MASK_ID
        assert torch.equal(before[kept], after[kept])


def test_threshold_commit_rule():
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        confidence = torch.rand((3, 16), generator=generator)
        candidates = torch.rand((3, 16), generator=generator) < 0.6
        candidates[:, 0] = True
        commit = commit_above_threshold(confidence, candidates, 0.7)
        assert not (commit & ~candidates).any()
        assert (commit.sum(-1) >= 1).all()
        for row in range(3):
            below = commit[row] & (confidence[row] < 0.7)
            best = confidence[row].masked_fill(~candidates[row], -1).max()
            # the only commit below the threshold is the single forced, most confident one
            assert below.sum() <= 1
            if below.any():
                assert confidence[row][below].item() == best.item()
                assert commit[row].sum() == 1


def test_threshold_generation_never_commits_below_threshold_except_forced():
    model = random_model("llada")
    recorder = Recorder(model)
    out = generate(recorder, [[3, 4, 5]], steps=8, gen_length=8, block_length=8, threshold=0.5)
    states = recorder.inputs + [out.tokens]
    for before, after in zip(states, states[1:]):
        with torch.no_grad():
            probs = model(before).logits.softmax(-1)[0]
        new = ((before == MASK_ID) & (after != MASK_ID))[0]
        conf = probs.gather(-1, after[0][:, None]).squeeze(-1)[new]
        assert new.sum() >= 1
        assert (conf >= 0.5).all() or new.sum() == 1
    assert not (out.completions() == MASK_ID).any()
    assert out.forward_passes == len(recorder.inputs)


def test_commit_top_k_picks_most_confident_candidates():
    confidence = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.95]])
    candidates = torch.tensor([[True, True, True, True, False]])
    assert commit_top_k(confidence, candidates, torch.tensor([2])).tolist() == [[True, False, True, False, False]]
    # never more than there are candidates
    assert commit_top_k(confidence, candidates, torch.tensor([9])).sum() == 4


def test_gumbel_sampling_follows_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)
    draws = sample_tokens(logits, 1.0, torch.Generator().manual_seed(0))
    assert abs(draws.float().mean().item() - 0.75) < 0.015
    assert torch.equal(sample_tokens(logits, 0.0), torch.ones(20000, dtype=torch.long))


def test_dream_schedule_unmasks_everything_by_the_last_step():
    remaining = torch.tensor([16])
    total = 0
    for step in range(8):
        n = dream_transfer_count(remaining - total, step, 8)
        assert n.item() >= 0
        total += n.item()
    assert total == 16


@pytest.mark.parametrize("policy", ["random", "maskgit_plus", "topk_margin", "entropy", "origin"])
def test_every_policy_completes_the_answer(policy):
    out = generate(random_model("dream"), [[3, 4, 5]], steps=8, gen_length=8, block_length=4, remasking=policy,
                   temperature=0.5, generator=torch.Generator().manual_seed(1))
    assert not (out.completions() == MASK_ID).any()


def test_topk_margin_and_entropy_rank_by_their_own_measure():
    logits = torch.log(torch.tensor([[[0.5, 0.49, 0.01], [0.4, 0.3, 0.3]]]))
    candidates = torch.ones((1, 2), dtype=torch.bool)
    margin, _ = select("topk_margin", logits, candidates, torch.tensor([1]))
    top1, _ = select("maskgit_plus", logits, candidates, torch.tensor([1]))
    entropy, _ = select("entropy", logits, candidates, torch.tensor([1]))
    assert margin.tolist() == [[False, True]]  # margin 0.01 vs 0.1
    assert top1.tolist() == [[True, False]]
    assert entropy.tolist() == [[True, False]]  # the first is more certain


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_batched_padded_generation_equals_one_by_one(model_type, threshold):
    model = random_model(model_type)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    batched = generate(model, prompts, steps=8, gen_length=8, block_length=4, threshold=threshold, pad_id=PAD_ID)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], steps=8, gen_length=8, block_length=4, threshold=threshold)
        assert torch.equal(batched.completions()[row], alone.completions()[0]), f"row {row} differs"


def test_classifier_free_guidance_formula():
    model = random_model("llada")
    x = torch.tensor([[3, 4, 5, MASK_ID, MASK_ID]])
    prompt = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        cond = model(x).logits
        uncond = model(x.masked_fill(prompt, MASK_ID)).logits
        guided = model_logits(model, x, None, prompt, MASK_ID, 2.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    assert torch.equal(model_logits(model, x, None, prompt, MASK_ID, 0.0), cond)


def test_schedule_validation_names_the_problem():
    with pytest.raises(ValueError, match="multiple of block_length"):
        validate_schedule(8, 10, 4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        validate_schedule(3, 8, 4)
    with pytest.raises(ValueError, match="unknown remasking"):
        generate(random_model("llada"), [[1]], steps=4, gen_length=4, block_length=4, remasking="bogus")
