"""HTTP request and response bodies (pydantic; they make the OpenAPI schema at /docs).

`/v1/completions` and `/v1/chat/completions` follow OpenAI's APIs, plus the DLM
knobs as optional extra fields. One rule set for all three endpoints: types are
strict (no `"4"` for 4, no `true` for 1, no `"yes"` for true), unknown fields are
refused with an error naming them, text must be valid Unicode (a lone UTF-16
surrogate is refused here, before any tokenizer sees it), and OpenAI parameters we
cannot honour are accepted only at their neutral value.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from serve.engine.requests import MAX_SEED, unicode_problem
from sinkprune.dlm.decoding import POLICIES

MAX_TOKENS_LIMIT = 4096  # the most any deployment may allow; the served model's sequence may allow less
STRICT = ConfigDict(extra="forbid", strict=True)


def _unicode(value: str) -> str:
    if problem := unicode_problem(value):
        raise ValueError(problem)
    return value


INTEGER_FIELDS = ("steps", "block_length", "max_tokens", "seed", "n")
INTEGER_LIST_FIELDS = ("prompt", "stop_token_ids")


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integral_fields(data):
    """JSON Schema counts 4.0 as an integer, so these fields take it; strict mode still
    refuses "4", true and 4.5."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in INTEGER_FIELDS:
        if name in data:
            data[name] = _integral(data[name])
    for name in INTEGER_LIST_FIELDS:
        if isinstance(data.get(name), list):
            data[name] = [_integral(item) for item in data[name]]
    return data


def _no_coercion(value):
    if not isinstance(value, bool):
        raise ValueError("must be false")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
# a prompt must hold some non-space character; JSON Schema's `pattern` says so to clients too
PromptText = Annotated[str, Field(pattern=r"\S", description="text with at least one non-space character"),
                       AfterValidator(_unicode)]
Prompt = Annotated[PromptText | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
                   Field(description="text, or token ids")]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class DLMKnobs(BaseModel):
    """Denoising parameters and stop token ids; unset ones take the engine's defaults."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data):
        return _integral_fields(data)

    steps: int | None = Field(None, ge=1, description="denoising steps over the whole answer (default: max_tokens)")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block size (default: max_tokens)")
    remasking: Literal[POLICIES] | None = Field(None, description="decoding policy")  # type: ignore[valid-type]
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="Fast-dLLM parallel decoding threshold")
    prefix_cache: bool | None = Field(None, description="reuse the committed prefix's K/V within a block")
    dual_cache: bool | None = Field(None, description="reuse the K/V before and after the block within a block "
                                                      "(Fast-dLLM DualCache; implies prefix_cache)")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=8, description="token ids that end the completion "
                                             "as EOS does (e.g. an end-of-turn token)")


class SharedFields(DLMKnobs):
    """What every generation endpoint takes, with the same rules."""

    # its ceiling is the deployment's (the model's sequence minus the prompt): checked by the router,
    # stated by the OpenAPI document, so that no message names a number the model cannot honour
    max_tokens: int = Field(64, ge=1, description="tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the same seed gives the same answer")
    stop: Stop | Annotated[list[Stop], Field(min_length=1, max_length=4)] | None = None
    user: Text | None = Field(None, max_length=256)


class OpenAIRequest(SharedFields):
    """What OpenAI's completions and chat completions requests share."""

    model: Text
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one completion per request")
    top_p: float = Field(1.0, ge=1.0, le=1.0, description="accepted only at 1.0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="accepted only at 0")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="accepted only at 0")
    logprobs: None = Field(None, description="not supported")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(OpenAIRequest):
    prompt: Prompt
    echo: Annotated[Literal[False], BeforeValidator(_no_coercion)] = Field(False, description="accepted only as false")


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat completions: the conversation goes through the model's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1)


class GenerateRequest(SharedFields):
    """The native API: every DLM knob, and the engine's own report in the answer."""

    model: Text | None = None
    prompt: Prompt


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int = 0
    finish_reason: str | None = None
    logprobs: None = None


class _Response(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: ChatResponseMessage


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class GenerateResponse(BaseModel):
    id: str
    model: str
    variant: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    seed: int
    forward_passes: int
    latency_s: float
    time_to_first_block_s: float | None
    queue_s: float | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sinkserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CanaryStatus(BaseModel):
    variant: str
    baseline: str
    status: str = Field(description="running, rolled_back or complete")
    weight: float = Field(description="the candidate's share of traffic now")
    steps: list[float]
    step: int
    step_started: float = Field(description="Unix time the current step began")
    evidence: dict = Field(description="the current step's live numbers, gate by gate")
    decisions: list[dict] = Field(description="recent decisions, newest last, with the numbers they read")


class RolloutStatus(BaseModel):
    """What the router decides now: its weights, its quality checks and its canary."""

    weights: dict[str, float]
    quality: dict = Field(description="sample_rate, reference and candidate of the paired quality checks")
    canary: CanaryStatus | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
