"""A replica's event stream as the client sees it: the first event or the final output as an
answer (a refusal as the APIError it is), and OpenAI-style SSE when the client streams."""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable

from serve.api import api_errors
from serve.api.api_errors import APIError, outcome_of
from serve.api.responses import stream_choice, usage
from serve.api.schemas import ChatCompletionRequest, CompletionRequest


class ReplicaGone(Exception):
    """The replica serving a request died or is stopping: the request may be sent again."""


def raise_if_error(event: dict) -> dict:
    """A replica's refusal or failure of this request, as the APIError the client gets."""
    if event["type"] == "error":
        raise APIError(event["status"], event["message"], event["kind"], event["param"], event["retry_after"])
    return event


async def first(events) -> dict:
    return raise_if_error(await events.__anext__())


async def last(events) -> dict:
    final = None
    async for event in events:
        final = raise_if_error(event)
    if final is None or final["type"] != "finished":
        raise ReplicaGone("the replica's stream ended without a result")
    return final["output"]


async def _prepend(head: dict, events):
    yield head
    async for event in events:
        yield event


def sse_error(message: str, kind: str) -> str:
    return f"data: {json.dumps(api_errors.error_body(message, kind))}\n\n"


async def sse(body: CompletionRequest | ChatCompletionRequest, variant: str, head: dict, events, end: dict,
              answered: Callable[[dict], None]):
    """OpenAI-style SSE: text chunks, a final chunk with finish_reason, usage if asked, [DONE].
    Chat streams open with the assistant's role and carry `delta`s. Its outcome (and output)
    go in `end`, counted by `end["finish"]()` when it ends (`cancelled` if the client left);
    `answered(output)` once the whole answer has gone out."""
    chat = isinstance(body, ChatCompletionRequest)
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    kind, created = "chat.completion.chunk" if chat else "text_completion", int(time.time())

    def chunk(text: str, finish: str | None = None, counts: dict | None = None, choices: bool = True,
              role: bool = False) -> str:
        choice = stream_choice(body, text, finish)
        if role:
            choice["delta"]["role"] = "assistant"
        data = {"id": cid, "object": kind, "created": created, "model": body.model,
                "choices": [choice] if choices else [], "usage": counts}
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk("", role=True)
        try:
            async for event in _prepend(head, events):
                if event["type"] == "finished":
                    output = event["output"]
                    yield chunk("", output["finish_reason"])
                    if body.include_usage:
                        yield chunk("", counts=usage(output).model_dump(), choices=False)
                    end["outcome"], end["output"] = "ok", output
                    answered(output)
                elif event["type"] == "error":
                    end["outcome"] = outcome_of(event["status"])
                    yield sse_error(event["message"], event["kind"])
                elif event.get("text"):
                    yield chunk(event["text"])
        except ReplicaGone as gone:  # the client has seen part of the answer: it cannot be sent again
            end["outcome"] = "unavailable"
            yield sse_error(f"variant {variant} stopped answering ({gone})", "unavailable")
        yield "data: [DONE]\n\n"
    finally:
        end["finish"]()
