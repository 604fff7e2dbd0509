"""Turning prompt text into token ids the way each model family was trained."""
from __future__ import annotations

from sinkprune.dlm.config import LLADA, DLMConfig


CHAT_ROLES = ("system", "user", "assistant")


def encode_prompt(tokenizer, text: str, config: DLMConfig) -> list[int]:
    """The tokenizer's own special-token convention, plus BOS first for LLaDA-style
    models (their sequences always start with it; Dream's, Qwen-style, do not)."""
    return _bos_first(list(tokenizer(text)["input_ids"]), config)


def encode_chat(tokenizer, messages: list[dict[str, str]], config: DLMConfig) -> list[int]:
    """A conversation through the tokenizer's chat template, ready for the assistant's
    turn (as LLaDA's and Dream's instruct models are prompted). The template writes
    its own special tokens, so none are added; ValueError if there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _bos_first(list(tokenizer(text, add_special_tokens=False)["input_ids"]), config)


def _bos_first(ids: list[int], config: DLMConfig) -> list[int]:
    bos = config.bos_token_id
    if config.model_type == LLADA and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def decode_completion(tokenizer, ids: list[int], eos_token_id: int | None) -> str:
    """Text of a completion, cut at the first EOS (DLMs fill the tail with EOS)."""
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)
