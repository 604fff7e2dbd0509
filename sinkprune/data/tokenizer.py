"""Byte-level BPE tokenizer of the embedded model, trained on the offline corpus.

Special tokens have fixed ids: 0 `<|bos|>`, 1 `<|eos|>`, 2 `<|mask|>`,
3 `<|pad|>` (`SPECIAL_TOKENS` order). Encoding adds nothing: no BOS, no EOS,
so callers add `BOS_ID` (and `EOS_ID`) explicitly where the model expects them.
Decoding gives back the exact input text: byte-level, no normalisation, no
lower-casing, no clean-up of spaces around punctuation.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sinkprune.data.corpus import load_text_files

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "mask_token": "<|mask|>",
    "pad_token": "<|pad|>",
}
BOS_ID, EOS_ID, MASK_ID, PAD_ID = range(4)
DEFAULT_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
WRITES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what train_tokenizer saves
PACKAGE_TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


def _untrained_tokenizer() -> Tokenizer:
    """BPE over bytes with GPT-2's pre-tokenisation; no normaliser, no post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _tokenizer_config() -> dict:
    """What `AutoTokenizer` needs: the class, the special tokens, no added BOS/EOS."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }


def train_tokenizer(
    texts_or_path: str | Path | Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    progress: bool = True,
) -> Path:
    """Train on documents (or a corpus file, read with `load_text_files`) and save.

    Writes `tokenizer.json`, `tokenizer_config.json` and
    `special_tokens_map.json` to `out_dir`; returns `out_dir`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + specials)")
    if isinstance(texts_or_path, (str, Path)):
        texts_or_path = load_text_files([texts_or_path])
    tokenizer = _untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts_or_path, trainer)
    _check_special_ids(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS)
    return out


def _check_special_ids(tokenizer: Tokenizer) -> None:
    """The model hard-codes these ids, so a library change must fail loudly."""
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS.values()]
    if ids != [BOS_ID, EOS_ID, MASK_ID, PAD_ID]:
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..3")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
