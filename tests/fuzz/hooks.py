"""Schemathesis hooks for `tests/test_openapi_fuzz_e2e.py` (loaded via SCHEMATHESIS_HOOKS).

The OpenAPI document states every rule JSON Schema can state. A few rules span fields
or depend on the serving model (block_length divides max_tokens; steps fit the blocks;
prompt + max_tokens fit the sequence; token ids below the vocabulary; chat needs a chat
template) and are documented under 400. A schema-valid request may get a 400 only for
one of those, never for a field the schema claims to accept.
"""
import schemathesis

CROSS_FIELD_PARAMS = {"block_length", "steps", "max_tokens", "prompt", "messages", "stop_token_ids"}


@schemathesis.check
def valid_requests_refused_only_by_cross_field_rules(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    error = response.json()["error"]
    if error["param"] not in CROSS_FIELD_PARAMS or "Input should" in error["message"]:
        raise AssertionError(f"a schema-valid request was refused for {error['param']!r}: {error['message']}")
    return None
