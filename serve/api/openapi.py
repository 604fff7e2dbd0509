"""The OpenAPI document as the deployment really behaves.

FastAPI documents 200 and 422 only; this API never answers 422 (validation errors are
400s in OpenAI's shape) and does answer 401, 404, 408, 413, 429, 500, 503 and 504, streams
`text/event-stream`, accepts only the model names it serves and at most the `max_tokens`
the served model can generate (its sequence length minus the prompt, and at most what the
deployment is configured for). Built once per deployment from its configuration.
"""
from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serve.api.schemas import ErrorResponse

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/generate")
STREAMING_PATHS = ("/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/healthz",)
REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest")

DESCRIPTIONS = {
    400: "Invalid request; `error.param` names the field. Some rules span fields and are checked here, not "
         "in this schema: `block_length` divides `max_tokens`, `steps` is a multiple of the number of blocks "
         "and at most `max_tokens`, prompt tokens + `max_tokens` fit the model, token ids are below its "
         "vocabulary size, chat needs a model with a chat template.",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`).",
    404: "Unknown model name.",
    408: "The request body did not arrive whole within the deployment's deadline (`body_timeout_s`); the "
         "connection is closed.",
    413: "Request body over the configured limit.",
    429: "The variant's queue is full, or the router holds as many requests (or bodies still arriving) as it "
         "may; retry after `Retry-After` seconds.",
    500: "A bug while serving this request (this request only).",
    503: "No replica of the variant can serve now; retry after `Retry-After` seconds.",
    504: "The variant did not answer in time.",
}
SSE_EVENT = {  # one server-sent event (OpenAPI before 3.2: the schema of a stream describes each event)
    "type": "object", "required": ["data"],
    "description": "`stream: true`: OpenAI server-sent events; `data` holds a JSON chunk (or an error in "
                   "the error shape), the last one is `[DONE]`",
    "properties": {"data": {"type": "string"}, "event": {"type": "string", "enum": ["message"]}},
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _error(status: int) -> dict:
    response = {"description": DESCRIPTIONS[status],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if status in (429, 503, 504):
        response["headers"] = copy.deepcopy(RETRY_AFTER)
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def statuses(path: str, auth: bool) -> list[int]:
    """The error statuses `path` can answer."""
    if path in OPEN_PATHS:
        return [503]
    errors = [401] if auth else []
    if path in GENERATION_PATHS:
        errors += [400, 404, 408, 413, 429, 500, 503, 504]
    else:
        errors += [500]
    return sorted(errors)


def max_tokens_rule(max_tokens: int, max_sequence: int | None) -> str:
    """What `max_tokens` may be on this deployment, in words (the document and refusals say the same)."""
    rule = f"at most {max_tokens} on this deployment"
    if max_sequence:
        rule += (f", and prompt tokens + max_tokens at most {max_sequence} (the served model's sequence length), "
                 f"so at most {max_sequence} minus the prompt's tokens")
    return rule


def build(app: FastAPI, model_names: list[str], max_tokens: int, auth: bool, max_sequence: int | None = None) -> dict:
    """`max_tokens`: the most a request may ask here, already within the model's `max_sequence`
    (prompt included; None when unknown)."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(components["ErrorResponse"].pop("$defs", {}))
    for name in REQUEST_SCHEMAS:
        properties = components.get(name, {}).get("properties", {})
        if "model" in properties:
            properties["model"] = _with_names(properties["model"], model_names)
        if "max_tokens" in properties:
            properties["max_tokens"]["maximum"] = max_tokens
            properties["max_tokens"]["default"] = min(properties["max_tokens"]["default"], max_tokens)
            properties["max_tokens"]["description"] = f"tokens to generate: {max_tokens_rule(max_tokens, max_sequence)}"
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in statuses(path, auth):
                responses[str(status)] = _error(status)
            if path in STREAMING_PATHS:
                responses["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            if auth and path not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
    return schema


def _with_names(model: dict, names: list[str]) -> dict:
    """`model` restricted to the served names (also when it is optional: anyOf with null)."""
    model = copy.deepcopy(model)
    for option in model.get("anyOf", [model]):
        if option.get("type") == "string":
            option["enum"] = list(names)
            option.pop("pattern", None)
    return model
