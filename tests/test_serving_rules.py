"""Serving rules without Ray: one strict rule set for the three generation endpoints, the
engine's checks before tokenising, and when a variant counts as down."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from serve.api.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from serve.decisions.variant_health import VariantHealth
from serve.engine.requests import GenerationRequest, RequestError, longest_token_chars, prepare

ENDPOINT_BODIES = {
    CompletionRequest: {"model": "sinkserve", "prompt": "hi"},
    GenerateRequest: {"prompt": "hi"},
    ChatCompletionRequest: {"model": "sinkserve", "messages": [{"role": "user", "content": "hi"}]},
}
SHARED_BAD = [  # (field, value): coerced or invalid values every endpoint refuses the same way
    ("max_tokens", True), ("max_tokens", "4"), ("steps", "4"), ("steps", 4.5), ("n", 1.5), ("temperature", "hot"),
    ("seed", -1), ("seed", 2**53), ("stop", []), ("stop", [""]), ("stop", ["\ud800"]), ("dual_cache", "yes"),
    ("prefix_cache", 1), ("stop_token_ids", [True]), ("stop_token_ids", [-1]), ("user", "\udfff"),
    ("threshold", 0), ("remasking", "nope"),
]


@pytest.mark.parametrize("schema", list(ENDPOINT_BODIES), ids=lambda s: s.__name__)
@pytest.mark.parametrize("field, value", SHARED_BAD)
def test_one_strict_rule_set_for_every_endpoint(schema, field, value):
    with pytest.raises(ValidationError) as refused:
        schema.model_validate({**ENDPOINT_BODIES[schema], field: value})
    assert refused.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("schema", [CompletionRequest, GenerateRequest], ids=lambda s: s.__name__)
@pytest.mark.parametrize("prompt", ["", " \n\t", [], [True], ["1"], "\ud800", "ok\udc00"])
def test_prompts_are_refused_alike_on_completions_and_generate(schema, prompt):
    with pytest.raises(ValidationError):
        schema.model_validate({**ENDPOINT_BODIES[schema], "prompt": prompt})


def test_valid_values_still_pass_and_ints_are_floats():
    for schema, body in ENDPOINT_BODIES.items():
        parsed = schema.model_validate({**body, "temperature": 1, "stop": ["\n"], "max_tokens": 8, "steps": 8})
        assert parsed.temperature == 1.0 and parsed.max_tokens == 8
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2.0]}).prompt == [1, 2]
    assert GenerateRequest.model_validate({"prompt": "x", "steps": 4.0}).steps == 4  # JSON Schema's integer
    for echo in (0, None, "false", True):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": echo})
    assert ChatCompletionRequest.model_validate({**ENDPOINT_BODIES[ChatCompletionRequest],
                                                 "stream_options": {"include_usage": True}}).include_usage


class CountingTokenizer:
    """The embedded model's tokenizer, counting how often it is asked to encode."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def embedded():
    from sinkprune.dlm.loading import load_model

    model, tokenizer = load_model("embedded")
    return model.config, tokenizer


def test_huge_prompts_are_refused_before_tokenising(embedded):
    config, tokenizer = embedded
    counting = CountingTokenizer(tokenizer)
    longest = longest_token_chars(tokenizer)
    assert longest >= 1
    max_chars = 256 * longest
    with pytest.raises(RequestError) as refused:
        prepare(GenerationRequest("x" * (max_chars + 1), max_tokens=8), counting, config, 256,
                max_prompt_chars=max_chars)
    assert refused.value.field == "prompt" and counting.calls == 0
    with pytest.raises(RequestError) as refused:
        prepare(GenerationRequest(messages=[{"role": "user", "content": "y" * (max_chars + 1)}], max_tokens=8),
                counting, config, 256, max_prompt_chars=max_chars)
    assert refused.value.field == "messages" and counting.calls == 0
    # a prompt under the bound is tokenised and then held to the token limit as before
    with pytest.raises(RequestError) as refused:
        prepare(GenerationRequest("word " * 300, max_tokens=8), counting, config, 256, max_prompt_chars=max_chars)
    assert refused.value.field == "max_tokens" and counting.calls == 1


def test_the_bound_is_safe_every_token_is_at_most_that_long(embedded):
    _, tokenizer = embedded
    text = "Ünïcødé ✓ 🙂 \t tabs\n" * 50 + "".join(chr(c) for c in range(0x20, 0x2000, 7))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(text) <= len(ids) * longest_token_chars(tokenizer)


@pytest.mark.parametrize("prompt, field", [("\ud800", "prompt"), ("fine\udfffthen", "prompt")])
def test_lone_surrogates_are_a_400_for_that_request(embedded, prompt, field):
    config, tokenizer = embedded
    with pytest.raises(RequestError) as refused:
        prepare(GenerationRequest(prompt, max_tokens=8), tokenizer, config, 256)
    assert refused.value.field == field and "surrogate" in str(refused.value)
    with pytest.raises(RequestError) as refused:
        prepare(GenerationRequest(messages=[{"role": "user", "content": prompt}], max_tokens=8), tokenizer, config,
                256)
    assert refused.value.field == "messages"


def test_a_variant_is_down_only_while_its_probe_fails():
    answers = {"dense": True, "pruned": False}
    downs: list[str] = []

    async def probe(variant: str):
        if answers[variant] is None:
            await asyncio.sleep(10)  # never answers
        if not answers[variant]:
            raise RuntimeError("replica died")

    async def scenario():
        health = VariantHealth(probe, ["dense", "pruned"], timeout_s=0.2, interval_s=0.05, on_down=downs.append)
        assert await health.check("dense") is True and health.down == frozenset()
        assert await health.check("pruned") is None and health.down == {"pruned"}
        assert await health.check("pruned") is None and downs == ["pruned"]  # counted once per outage
        answers["pruned"] = True  # a new replica: the watcher brings the variant back by itself
        for _ in range(40):
            await asyncio.sleep(0.05)
            if not health.down:
                break
        assert health.down == frozenset()
        answers["dense"] = None  # a replica that does not answer in time is down too
        assert not await health.check("dense") and health.down == {"dense"} and downs == ["pruned", "dense"]

    asyncio.run(scenario())
