"""One HTTP request against the OpenAI-compatible completions API, timed.

Streaming is used so the time to the first committed block (the first SSE
chunk carrying text) is measured as the client sees it; the final chunk's
`usage` gives the token counts, and the `x-dlm-variant` header says which
variant served the request. Every failure becomes a record with its kind.

Each text-carrying chunk's arrival time is kept (`chunk_times_s`): inter-token
latency (ITL) is the gap between successive ones, as vLLM's benchmark times it.
A diffusion LM commits a block of several tokens per chunk, so ITL here is the
time between committed blocks, not between single tokens; the chat stream's
opening role chunk and the empty closing chunk carry no text and are not counted.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp

VARIANT_HEADER = "x-dlm-variant"
USER_HEADER = "x-user-id"


@dataclass
class RequestRecord:
    index: int
    user: str | None
    variant_requested: str | None
    variant: str | None = None
    ok: bool = False
    error_kind: str | None = None
    http_status: int | None = None
    sent_at: float = 0.0  # seconds since the run started
    ttft_s: float | None = None  # time to first committed block (first text chunk)
    e2e_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each text chunk, since sent
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    chat: bool = False  # /v1/chat/completions with the prompt as one user message, else /v1/completions


async def send_completion(session: aiohttp.ClientSession, target: Target, record: RequestRecord, prompt: str,
                          max_tokens: int, extra: dict | None = None, run_start: float = 0.0) -> RequestRecord:
    """Send one streaming completion and fill `record` in place (never raises for server errors)."""
    headers = {}
    if record.variant_requested:
        headers[VARIANT_HEADER] = record.variant_requested
    if record.user:
        headers[USER_HEADER] = record.user
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    body = {"model": target.model, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, **(extra or {})}
    if target.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if target.chat else "/v1/completions"
    if record.user:
        body["user"] = record.user
    began = time.perf_counter()
    record.sent_at = began - run_start
    try:
        async with session.post(target.base_url.rstrip("/") + path, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=target.timeout_s)) as response:
            record.http_status = response.status
            record.variant = response.headers.get(VARIANT_HEADER)
            if response.status != 200:
                record.error_kind = f"http_{response.status}"
                await response.read()
            else:
                await _read_stream(response, record, began)
    except asyncio.TimeoutError:
        record.error_kind = "timeout"
    except aiohttp.ClientConnectionError:
        record.error_kind = "connection"
    except (aiohttp.ClientPayloadError, ValueError):
        record.error_kind = "protocol"
    record.e2e_s = time.perf_counter() - began
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, began: float) -> None:
    done = False
    pieces = []
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error_kind = f"stream_{chunk['error'].get('type', 'error')}"
            return
        text = "".join(choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                       for choice in chunk.get("choices", []))
        if text:
            record.chunk_times_s.append(time.perf_counter() - began)
            if record.ttft_s is None:
                record.ttft_s = record.chunk_times_s[0]
        pieces.append(text)
        if chunk.get("usage"):
            record.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            record.output_tokens = chunk["usage"].get("completion_tokens", 0)
    record.text = "".join(pieces)
    if not done:
        record.error_kind = "protocol"  # the stream ended without [DONE]
        return
    record.ok = True
