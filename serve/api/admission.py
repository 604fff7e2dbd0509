"""What a request may ask of this deployment: a model it serves, a max_tokens within its
ceiling, and a variant it may force (the `x-dlm-variant` header or a `sinkserve:<variant>`
model, the same on every endpoint)."""
from __future__ import annotations

from serve.api import openapi
from serve.api.api_errors import VARIANT_HEADER, APIError


def model_names(model_name: str, variants: list[str]) -> list[str]:
    return [model_name] + [f"{model_name}:{v}" for v in sorted(variants)]


def check(body, names: list[str], max_tokens: int, max_sequence: int | None) -> None:
    if body.model is not None and body.model not in names:
        raise APIError(404, f"model {body.model!r} does not exist; available: {', '.join(names)}", param="model")
    if "max_tokens" not in body.model_fields_set:  # the default may not exceed this deployment's limit
        body.max_tokens = min(body.max_tokens, max_tokens)
    if body.max_tokens > max_tokens:
        raise APIError(400, f"max_tokens: {openapi.max_tokens_rule(max_tokens, max_sequence)}, "
                            f"got {body.max_tokens}", param="max_tokens")


def forced_variant(headers, body, variants: list[str]) -> str | None:
    """The variant a request names, if any; an unknown one is refused."""
    forced = headers.get(VARIANT_HEADER)
    if not forced and body.model and ":" in body.model:
        forced = body.model.split(":", 1)[1]
    if forced is not None and forced not in variants:
        raise APIError(400, f"unknown variant {forced!r}; configured: {', '.join(sorted(variants))}",
                       param=VARIANT_HEADER)
    return forced
