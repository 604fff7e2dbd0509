"""Turning prompt text into token ids the way each model family was trained."""
from __future__ import annotations

from sinkprune.dlm.config import LLADA, DLMConfig


def encode_prompt(tokenizer, text: str, config: DLMConfig) -> list[int]:
    """The tokenizer's own special-token convention, plus BOS first for LLaDA-style
    models (their sequences always start with it; Dream's, Qwen-style, do not)."""
    ids = list(tokenizer(text)["input_ids"])
    bos = config.bos_token_id
    if config.model_type == LLADA and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def decode_completion(tokenizer, ids: list[int], eos_token_id: int | None) -> str:
    """Text of a completion, cut at the first EOS (DLMs fill the tail with EOS)."""
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)
