"""The paired quality check's parts: token agreement, and the engine scoring answers with
LLaDA's estimator on the same masks (so equal answers score equally and a worse answer's
gap is measured against the model's own)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from serve.decisions.quality import token_agreement
from serve.engine.config import EngineConfig
from serve.engine.engine import DLMEngine
from serve.engine.requests import GenerationRequest, RequestError
from sinkprune.dlm.likelihood import estimate_nll
from tests.conftest import random_model

PROMPT = [5, 9, 12, 7, 3]


def test_token_agreement_counts_positions_over_the_longer_answer():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # what one answer lacks disagrees
    assert token_agreement([], []) == 1.0 and token_agreement([], [3]) == 0.0


def own_answer_and_scores(engine: DLMEngine, others: list[dict], samples: int = 16, seed: int = 3):
    """The engine's own answer to PROMPT, then the scores of [own, *others] (None in `others`:
    the own answer again), in one event loop as the engine requires."""
    async def run():
        own = await engine.generate(GenerationRequest(PROMPT, max_tokens=8, seed=1))
        answer = {"token_ids": own.token_ids, "finish_reason": own.finish_reason}
        return answer, await engine.score(GenerationRequest(PROMPT, max_tokens=8), [answer, *(o or answer for o in others)],
                                          samples, seed)

    return asyncio.run(run())


def test_scores_are_llada_estimates_of_prompt_plus_answer_and_paired():
    model = random_model("llada", dtype=torch.float32)
    engine = DLMEngine(model, None, EngineConfig())
    stopped = {"token_ids": [4, 4, 4], "finish_reason": "stop"}
    answer, (a, b, c) = own_answer_and_scores(engine, [None, stopped])
    assert a == b  # the same answer, the same masks: a pair of equal answers has a gap of exactly 0
    eos = model.config.eos_token_ids[0]
    expected = estimate_nll(model, torch.tensor([PROMPT + [4, 4, 4, eos]]), 16, 3, batch_size=16,
                            scored_from=len(PROMPT)).mean
    assert c == pytest.approx(expected, rel=1e-6)  # a stopped answer is scored with the token that stopped it


def test_the_models_own_answer_is_more_likely_than_noise():
    model = random_model("llada", dtype=torch.float32)
    engine = DLMEngine(model, None, EngineConfig())
    noise = torch.randint(2, 90, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    _, (mine, theirs) = own_answer_and_scores(engine, [{"token_ids": noise, "finish_reason": "length"}], samples=32)
    assert theirs - mine > 0.2  # the gap the quality gate reads (a random model is near uniform: 0.28 here)


def test_any_request_seed_can_score_even_53_bit_ones():
    """Served requests without a seed get a random 53-bit one, which the check reuses for its masks."""
    engine = DLMEngine(random_model("llada", dtype=torch.float32), None, EngineConfig())
    _, (a, b) = own_answer_and_scores(engine, [None], seed=2**53 - 1)
    assert a == b


def test_an_answer_that_cannot_be_scored_is_refused_by_name():
    engine = DLMEngine(random_model("llada", dtype=torch.float32), None, EngineConfig())
    with pytest.raises(RequestError, match="answers"):
        own_answer_and_scores(engine, [{"token_ids": [], "finish_reason": "length"}])
