"""What callers hand the engine and what they get back: requests and their
validation, the errors an HTTP layer maps to status codes, streamed events and
the final output."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from sinkprune.dlm.config import DREAM, LLADA, DLMConfig
from sinkprune.dlm.decoding import POLICIES
from sinkprune.dlm.prompt import CHAT_ROLES, encode_chat, encode_prompt

DEFAULT_REMASKING = {LLADA: "low_confidence", DREAM: "maskgit_plus"}
MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 8
MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript included) reads back exactly

# finish reasons (OpenAI's "stop" covers both EOS and stop strings)
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
# stream event types
TOKENS, BLOCK, FINISHED = "tokens", "block", "finished"


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending parameter (HTTP 400/422)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class EngineOverloaded(RuntimeError):
    """The admission queue is full; retry after `retry_after` seconds (HTTP 429 + Retry-After)."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"engine overloaded: {waiting} requests already waiting; retry after {retry_after} s")
        self.retry_after = retry_after
        self.waiting = waiting


class EngineError(RuntimeError):
    """A request failed inside the engine (its forward pass raised)."""


@dataclass
class GenerationRequest:
    """One completion to generate. `None` means: the default stated beside it."""

    prompt: str | list[int] | None = None  # text or token ids; or give `messages`
    max_tokens: int = 64  # tokens to generate (LLaDA's gen_length)
    steps: int | None = None  # denoising steps over the whole answer; None: max_tokens (one token per step)
    block_length: int | None = None  # None: max_tokens (a single block)
    temperature: float = 0.0
    remasking: str | None = None  # None: the model family's own (LLaDA low_confidence, Dream maskgit_plus)
    threshold: float | None = None  # Fast-dLLM parallel decoding: commit every position at least this confident
    seed: int | None = None  # None: a random seed (reported in the output)
    stop: str | list[str] | None = None
    # token ids that end the completion as EOS does (an instruct model's end-of-turn, say); None: the engine's
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    prefix_cache: bool | None = None  # None: the engine's default
    dual_cache: bool | None = None  # None: the engine's default; True implies the prefix cache
    request_id: str | None = None  # None: a random id
    messages: list[dict[str, str]] | None = None  # a conversation ({role, content}), through the chat template


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with every default resolved and the prompt tokenised."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    steps: int
    block_length: int
    temperature: float
    remasking: str
    threshold: float | None
    seed: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    prefix_cache: bool
    dual_cache: bool

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise RequestError(name, f"must be >= {minimum}, got {value}")
    return value


def longest_token_chars(tokenizer) -> int | None:
    """The most characters one token of `tokenizer` can stand for (its longest vocabulary entry):
    a text longer than `max_length` times this cannot fit in `max_length` tokens, which is
    known without tokenising it (a multi-megabyte prompt would hold the event loop for seconds).
    None when the tokenizer cannot list its vocabulary."""
    vocab = getattr(tokenizer, "get_vocab", None)
    return max((len(token) for token in vocab()), default=1) if vocab is not None else None


def unicode_problem(text: str) -> str | None:
    """What makes `text` invalid Unicode (a lone UTF-16 surrogate, which JSON can carry and no
    tokenizer can encode), or None. The HTTP schema and the engine both check with it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid Unicode (unpaired surrogate at character {err.start})"
    return None


def _check_text(field_name: str, texts: list[str], max_chars: int | None) -> None:
    for text in texts:
        if problem := unicode_problem(text):
            raise RequestError(field_name, problem)
    chars = sum(len(text) for text in texts)
    if max_chars is not None and chars > max_chars:
        raise RequestError(field_name, f"is too long: {chars} characters cannot fit in the tokens one sequence "
                                       f"may have")


def _chat_ids(messages, tokenizer, config: DLMConfig, max_chars: int | None) -> list[int]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            raise RequestError("messages", f"message {i} must have a role among {', '.join(CHAT_ROLES)} and a "
                                           f"text content, got {message!r}")
    if tokenizer is None:
        raise RequestError("messages", "this engine has no tokenizer to render a conversation")
    _check_text("messages", [m["content"] for m in messages], max_chars)
    try:
        return encode_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], config)
    except ValueError as err:
        raise RequestError("messages", str(err)) from err


def _prompt_ids(prompt, tokenizer, config: DLMConfig, max_chars: int | None) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("prompt", "this engine has no tokenizer: give the prompt as token ids")
        _check_text("prompt", [prompt], max_chars)
        ids = encode_prompt(tokenizer, prompt, config)
    elif isinstance(prompt, (list, tuple)):
        ids = [_integer("prompt", token, 0) for token in prompt]
        if any(token >= config.vocab_size for token in ids):
            raise RequestError("prompt", f"token ids must be below the vocabulary size {config.vocab_size}")
    else:
        raise RequestError("prompt", f"must be text or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise RequestError("prompt", "must not be empty")
    return ids


def _stop_strings(stop) -> tuple[str, ...]:
    strings = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise RequestError("stop", "must be a non-empty string or a list of them")
    if len(strings) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(strings)


def _stop_token_ids(ids, config: DLMConfig, default: tuple[int, ...]) -> tuple[int, ...]:
    if ids is None:
        return default
    if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
    ids = tuple(_integer("stop_token_ids", token, 0) for token in ids)
    if any(token >= config.vocab_size for token in ids):
        raise RequestError("stop_token_ids", f"token ids must be below the vocabulary size {config.vocab_size}")
    return ids


def prepare(request: GenerationRequest, tokenizer, config: DLMConfig, max_length: int,
            prefix_cache_default: bool = False, dual_cache_default: bool = False,
            stop_token_ids_default: tuple[int, ...] = (), max_prompt_chars: int | None = None) -> PreparedRequest:
    """Validate `request` and resolve its defaults; raises `RequestError` naming the field.

    `max_length` bounds prompt + max_tokens (what one sequence may occupy in a step);
    a prompt text over `max_prompt_chars` characters is refused before it is tokenised.
    Beyond generate()'s own rules, `steps` may not exceed `max_tokens`: extra steps
    would commit nothing and only cost forward passes.
    """
    if request.messages is not None and request.prompt is not None:
        raise RequestError("messages", "give either a prompt or messages, not both")
    prompt_ids = _prompt_ids(request.prompt, tokenizer, config, max_prompt_chars) if request.messages is None \
        else _chat_ids(request.messages, tokenizer, config, max_prompt_chars)
    if not prompt_ids:
        raise RequestError("messages", "the conversation renders to no tokens")
    max_tokens = _integer("max_tokens", request.max_tokens, 1)
    if len(prompt_ids) + max_tokens > max_length:
        raise RequestError("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                         f"the {max_length} tokens one sequence may have")
    block_length = _integer("block_length", max_tokens if request.block_length is None else request.block_length, 1)
    if max_tokens % block_length:
        raise RequestError("block_length", f"must divide max_tokens {max_tokens}, got {block_length}")
    steps = _integer("steps", max_tokens if request.steps is None else request.steps, 1)
    blocks = max_tokens // block_length
    if steps % blocks or steps > max_tokens:
        raise RequestError("steps", f"must be a multiple of the number of blocks ({blocks}) and at most "
                                    f"max_tokens ({max_tokens}), got {steps}")
    temperature = request.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise RequestError("temperature", f"must be a finite number >= 0, got {temperature!r}")
    remasking = DEFAULT_REMASKING[config.model_type] if request.remasking is None else request.remasking
    if remasking not in POLICIES:
        raise RequestError("remasking", f"unknown policy {remasking!r}; choose one of {', '.join(POLICIES)}")
    threshold = request.threshold
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold <= 1):
        raise RequestError("threshold", f"must be in (0, 1], got {threshold!r}")
    seed = secrets.randbits(53) if request.seed is None else _integer("seed", request.seed, 0)
    if seed > MAX_SEED:
        raise RequestError("seed", f"must be at most 2**53 - 1, got {seed}")
    for name in ("ignore_eos", "prefix_cache", "dual_cache"):
        value = getattr(request, name)
        if not isinstance(value, bool) and not (name != "ignore_eos" and value is None):
            raise RequestError(name, f"must be true or false, got {value!r}")
    dual_cache = dual_cache_default if request.dual_cache is None else request.dual_cache
    request_id = request.request_id if request.request_id is not None else secrets.token_hex(8)
    if not isinstance(request_id, str) or not request_id:
        raise RequestError("request_id", "must be a non-empty string")
    return PreparedRequest(
        request_id=request_id, prompt_ids=prompt_ids, max_tokens=max_tokens, steps=steps,
        block_length=block_length, temperature=float(temperature), remasking=remasking,
        threshold=None if threshold is None else float(threshold), seed=seed, stop=_stop_strings(request.stop),
        stop_token_ids=_stop_token_ids(request.stop_token_ids, config, stop_token_ids_default),
        ignore_eos=request.ignore_eos,
        prefix_cache=dual_cache or (prefix_cache_default if request.prefix_cache is None else request.prefix_cache),
        dual_cache=dual_cache,
    )


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    forward_passes: int  # denoising steps this request ran: one row in one batched forward pass each
    computed_tokens: int  # positions the model computed for it over those passes (the prefix cache lowers it)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """The whole result. Times are `time.perf_counter()` seconds (None: never happened)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    seed: int
    arrival_time: float
    scheduled_time: float | None
    first_token_time: float | None
    first_block_time: float | None
    finished_time: float
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_to_first_block_s(self) -> float | None:
        return None if self.first_block_time is None else self.first_block_time - self.arrival_time


@dataclass
class StreamEvent:
    """One event of a request's stream.

    `tokens`: `token_ids` newly committed right after what was streamed before (a
    DLM commits anywhere in its block; only the contiguous committed prefix is
    streamed, so text can be appended) and the `text` they add; `block` is the
    block of the last of them. `block`: block `block` is fully committed.
    `finished`: the last event, with `output`.
    """

    type: str
    request_id: str
    time: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    block: int | None = None
    output: RequestOutput | None = None
