"""A request's body as the engine's payload, and the engine's output as OpenAI's completions or
chat completions response (or `/v1/generate`'s richer one)."""
from __future__ import annotations

from serve.api.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    Usage,
)

ENGINE_FIELDS = ("max_tokens", "temperature", "seed", "stop", "stop_token_ids", "steps", "block_length", "remasking",
                 "threshold", "prefix_cache", "dual_cache")


def request_to_engine(body: CompletionRequest | ChatCompletionRequest | GenerateRequest) -> dict:
    payload = {name: getattr(body, name) for name in ENGINE_FIELDS}
    if isinstance(body, ChatCompletionRequest):
        payload["messages"] = [message.model_dump() for message in body.messages]
    else:
        payload["prompt"] = body.prompt
    return payload


def usage(output: dict) -> Usage:
    counts = output["usage"]
    return Usage(prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"],
                 total_tokens=counts["prompt_tokens"] + counts["completion_tokens"])


def openai_response(body: CompletionRequest | ChatCompletionRequest, output: dict) -> dict:
    finish = output["finish_reason"]
    if isinstance(body, ChatCompletionRequest):
        choice = ChatChoice(message=ChatResponseMessage(content=output["text"]), finish_reason=finish)
        return ChatCompletionResponse(model=body.model, choices=[choice], usage=usage(output)).model_dump()
    choice = CompletionChoice(text=output["text"], finish_reason=finish)
    return CompletionResponse(model=body.model, choices=[choice], usage=usage(output)).model_dump()


def generate_response(body: GenerateRequest, model_name: str, variant: str, output: dict) -> dict:
    return GenerateResponse(
        id=output["request_id"], model=body.model or model_name, variant=variant, text=output["text"],
        token_ids=output["token_ids"], finish_reason=output["finish_reason"], usage=usage(output),
        seed=output["seed"], forward_passes=output["usage"]["forward_passes"], latency_s=output["latency_s"],
        time_to_first_block_s=output["time_to_first_block_s"], queue_s=output["queue_s"]).model_dump()


def stream_choice(body: CompletionRequest | ChatCompletionRequest, text: str, finish: str | None) -> dict:
    """One streamed choice: `text` for completions, a `delta` for chat (OpenAI's chunk shapes)."""
    if isinstance(body, ChatCompletionRequest):
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": None}
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
