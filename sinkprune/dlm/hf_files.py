"""The Hugging Face side files of a model directory that are not weights or tokenizer:
`generation_config.json` and the remote-code modules (`configuration_*.py`,
`modeling_*.py`, ...) that config.json's `auto_map` points at.

A directory we write carries the source's own files when it has them (LLaDA and
Dream ship remote code and a generation config), and otherwise a generation
config built from config.json's special token ids, as `save_pretrained` would.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")


def remote_code_files(model_dir: Path) -> list[Path]:
    """The Python modules of a model directory (HF remote code lives at its top level)."""
    return sorted(p for p in model_dir.glob("*.py") if p.is_file())


def generation_config(hf_config: dict) -> dict:
    """A generation config from config.json's token ids (what transformers derives from a model config)."""
    ids = {key: hf_config[key] for key in TOKEN_ID_KEYS if hf_config.get(key) is not None}
    return {"_from_model_config": True, **ids}


def write_hf_files(out: Path, hf_config: dict, source_dir: Path | None = None) -> list[Path]:
    """Write generation_config.json and copy the source's remote code into `out`; returns what was written."""
    written = []
    source_generation = source_dir / GENERATION_CONFIG if source_dir is not None else None
    if source_generation is not None and source_generation.is_file():
        shutil.copyfile(source_generation, out / GENERATION_CONFIG)
    else:
        (out / GENERATION_CONFIG).write_text(json.dumps(generation_config(hf_config), indent=2, sort_keys=True) + "\n")
    written.append(out / GENERATION_CONFIG)
    for module in remote_code_files(source_dir) if source_dir is not None else []:
        shutil.copyfile(module, out / module.name)
        written.append(out / module.name)
    return written


# transformers 5 saves a tokenizer.json-backed tokenizer as `TokenizersBackend`, a class
# transformers 4 does not know; `PreTrainedTokenizerFast` names the same thing in both.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_config_portable(out: Path) -> None:
    """Rewrite tokenizer_config.json's class so AutoTokenizer of transformers 4.x and 5.x both load it."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    portable = PORTABLE_TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
    if portable is not None:
        config["tokenizer_class"] = portable
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
