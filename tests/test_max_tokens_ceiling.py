"""The `max_tokens` a deployment advertises and enforces is what its models can generate: the
sequence length the engine computes, minus at least one prompt token; never a number it
cannot honour (the embedded model's sequence is 1,024 tokens, not 4,096)."""
from __future__ import annotations

import pytest

from serve.api.schemas import MAX_TOKENS_LIMIT, CompletionRequest
from serve.app import AppArgs, max_tokens_ceiling, model_sequence


@pytest.fixture(scope="module")
def embedded():
    from sinkprune.dlm.loading import load_model

    return load_model("embedded")


@pytest.mark.parametrize("engine", [{}, {"max_model_len": 256}, {"max_tokens_per_step": 512},
                                    {"max_model_len": 4096}])
def test_the_sequence_read_at_build_is_the_engines(embedded, engine):
    from serve.engine.config import EngineConfig
    from serve.engine.engine import DLMEngine

    model, tokenizer = embedded
    args = AppArgs(variants={"dense": {"model": "embedded", "engine": engine}})
    built = DLMEngine(model, tokenizer, EngineConfig(**engine, max_num_seqs=1))
    assert model_sequence(args.variants["dense"]) == built._max_length


def test_the_ceiling_is_the_shortest_sequence_minus_one_prompt_token():
    assert max_tokens_ceiling(AppArgs(model="embedded")) == (1023, 1024)
    short = AppArgs(variants={"dense": {"model": "embedded"},
                              "pruned": {"model": "embedded", "engine": {"max_model_len": 300}}})
    assert max_tokens_ceiling(short) == (299, 300)
    assert max_tokens_ceiling(AppArgs(model="embedded", max_tokens=32)) == (32, 1024)
    with pytest.raises(ValueError, match="max_tokens 2000: the served models hold 1024 tokens per sequence, "
                                         "prompt included, so at most 1023"):
        max_tokens_ceiling(AppArgs(model="embedded", max_tokens=2000))


def test_a_model_not_on_this_machine_leaves_the_configured_limit():
    """A cluster builds the app where the models may not be (the GPU nodes have them)."""
    assert max_tokens_ceiling(AppArgs(variants={"dense": {"model": "/models/absent"}})) == (MAX_TOKENS_LIMIT, None)
    assert max_tokens_ceiling(AppArgs(variants={"dense": {"model": "/models/absent"}}, max_tokens=64)) == (64, None)


def test_the_schema_names_no_ceiling_of_its_own():
    """A huge max_tokens passes the schema and is refused by the router with the deployment's real limit."""
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 10**6}).max_tokens == 10**6
    assert "maximum" not in CompletionRequest.model_json_schema()["properties"]["max_tokens"]


def test_the_openapi_document_states_the_real_ceiling_and_the_408():
    from serve.api import openapi
    from serve.ingress import app

    document = openapi.build(app, ["sinkserve"], 1023, auth=False, max_sequence=1024)
    schemas = document["components"]["schemas"]
    for name in openapi.REQUEST_SCHEMAS:
        field = schemas[name]["properties"]["max_tokens"]
        assert field["maximum"] == 1023 and field["default"] == 64, field
        assert "1024 (the served model's sequence length)" in field["description"], field
        assert "4096" not in str(field)
    for path in openapi.GENERATION_PATHS:
        responses = document["paths"][path]["post"]["responses"]
        assert "408" in responses and "body_timeout_s" in responses["408"]["description"]
    rule = openapi.max_tokens_rule(32, 1024)
    assert rule == ("at most 32 on this deployment, and prompt tokens + max_tokens at most 1024 (the served "
                    "model's sequence length), so at most 1024 minus the prompt's tokens")
    assert openapi.max_tokens_rule(64, None) == "at most 64 on this deployment"


@pytest.mark.slow
def test_the_live_app_states_and_enforces_the_real_ceiling(app):
    """The shared app (max_tokens 32 over the embedded model's 1,024-token sequence)."""
    import json
    import urllib.request

    from tests.test_serve_trust_e2e import send

    with urllib.request.urlopen(app.base_url + "/openapi.json", timeout=60) as response:
        document = json.loads(response.read())
    field = document["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]
    assert field["maximum"] == 32 and "at most 1024 (the served model's sequence length)" in field["description"]
    status, _, _, body = send(app.base_url, {"model": "sinkserve", "prompt": "x", "max_tokens": 5000})
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    assert body["error"]["message"] == ("max_tokens: at most 32 on this deployment, and prompt tokens + max_tokens "
                                        "at most 1024 (the served model's sequence length), so at most 1024 minus "
                                        "the prompt's tokens, got 5000")
    # a prompt that leaves less than max_tokens: the replica names both numbers
    status, _, _, body = send(app.base_url, {"model": "sinkserve", "prompt": [5] * 1000, "max_tokens": 32})
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    assert "prompt (1000 tokens) + max_tokens (32) exceeds the 1024 tokens" in body["error"]["message"], body
