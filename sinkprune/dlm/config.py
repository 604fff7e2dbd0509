"""One config for every supported diffusion LM, read from a checkpoint's config.json.

LLaDA checkpoints use OLMo-style keys (`d_model`, `n_layers`, ...), Dream uses
Qwen2 keys (`hidden_size`, `num_hidden_layers`, ...). `DLMConfig` normalises
both, and keeps the original dict so a saved model directory looks exactly like
the checkpoint it came from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sinkprune.dlm.errors import ConfigError

LLADA = "llada"
DREAM = "dream"
SUPPORTED_MODEL_TYPES = (LLADA, DREAM)


@dataclass(frozen=True)
class DLMConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    norm_eps: float
    max_position_embeddings: int
    mask_token_id: int
    qkv_bias: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the first when config.json lists several
    pad_token_id: int | None = None
    # every id config.json gives as EOS (instruct checkpoints may list an end-of-turn token beside EOS)
    eos_token_ids: tuple[int, ...] = ()
    # None: hidden_size // num_heads. Set explicitly once structured pruning has removed heads.
    explicit_head_dim: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "DLMConfig":
        """Normalise a checkpoint's config.json dict; raises ConfigError naming the problem."""
        model_type = str(hf.get("model_type", "")).lower()
        if model_type == LLADA:
            config = _from_llada(hf)
        elif model_type == DREAM:
            config = _from_dream(hf)
        else:
            raise ConfigError(
                f"unknown model_type {hf.get('model_type')!r}: supported are 'llada' and 'Dream'/'dream'"
            )
        config._validate()
        return config

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict to save: the original keys, with our values written back."""
        out = dict(self.hf_config) or _native_skeleton(self)
        out.update(_native_values(self))
        if out.get("head_dim") is None:
            out.pop("head_dim", None)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("hf_config")
        return data

    def _validate(self) -> None:
        for name, value, most in (("vocab size", self.vocab_size, 2**31 - 1), ("hidden size", self.hidden_size, 2**20),
                                  ("intermediate size", self.intermediate_size, 2**24),
                                  ("number of layers", self.num_layers, 1024), ("heads", self.num_heads, 65536),
                                  ("key/value heads", self.num_kv_heads, 65536),
                                  ("maximum sequence length", self.max_position_embeddings, 2**31 - 1)):
            if not 1 <= value <= most:
                raise ConfigError(f"{name} {value} is outside 1..{most}")
        if self.explicit_head_dim is not None and not 1 <= self.explicit_head_dim <= 2**16:
            raise ConfigError(f"head_dim {self.explicit_head_dim} is outside 1..65536")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError(f"rope_theta {self.rope_theta} and the norm epsilon {self.norm_eps} must be > 0")
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.num_heads} heads are not divisible by {self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ConfigError(f"bos_token_id {self.bos_token_id} outside the vocabulary of {self.vocab_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} outside the vocabulary of {self.vocab_size}")


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    value = hf.get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(_number(int, "eos_token_id", v) for v in values)


def _number(kind: type, key: str, value: Any) -> Any:
    """`value` of config.json's `key` as an int or a finite float, or ConfigError naming the key and value."""
    what = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key!r} is {value!r}, not {what}")
    try:
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except (ValueError, OverflowError):
        raise ConfigError(f"{key!r} is {value!r}, not {what}") from None
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{key!r} is {value!r}, not {what}")
    return number


def _optional_int(hf: dict[str, Any], key: str) -> int | None:
    return None if hf.get(key) is None else _number(int, key, hf[key])


def _require(hf: dict[str, Any], key: str, kind: type = int) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json of a {hf.get('model_type')} model lacks {key!r}")
    return _number(kind, key, hf[key])


def _from_llada(hf: dict[str, Any]) -> DLMConfig:
    if hf.get("weight_tying"):
        raise ConfigError("LLaDA config with weight_tying=true is not supported (public checkpoints are untied)")
    if hf.get("include_bias"):
        raise ConfigError("LLaDA config with include_bias=true is not supported (public checkpoints have no biases)")
    if hf.get("block_type", "llama") != "llama":
        raise ConfigError(f"LLaDA block_type {hf.get('block_type')!r} is not supported, only 'llama'")
    d_model = _require(hf, "d_model")
    hidden = _require(hf, "mlp_hidden_size") if hf.get("mlp_hidden_size") else \
        int(_number(float, "mlp_ratio", hf.get("mlp_ratio", 4)) * d_model)
    n_heads = _require(hf, "n_heads")
    return DLMConfig(
        model_type=LLADA,
        vocab_size=_require(hf, "embedding_size") if hf.get("embedding_size") else _require(hf, "vocab_size"),
        hidden_size=d_model,
        intermediate_size=hidden,
        num_layers=_require(hf, "n_layers"),
        num_heads=n_heads,
        num_kv_heads=_require(hf, "n_kv_heads") if hf.get("n_kv_heads") else n_heads,
        rope_theta=_number(float, "rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=_number(float, "rms_norm_eps", hf.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=_number(int, "max_sequence_length", hf.get("max_sequence_length", 4096)),
        mask_token_id=_require(hf, "mask_token_id"),
        qkv_bias=False,
        explicit_head_dim=_optional_int(hf, "head_dim"),
        bos_token_id=_optional_int(hf, "bos_token_id"),
        eos_token_id=(_eos_ids(hf) or (None,))[0],
        pad_token_id=_optional_int(hf, "pad_token_id"),
        eos_token_ids=_eos_ids(hf),
        hf_config=dict(hf),
    )


def _from_dream(hf: dict[str, Any]) -> DLMConfig:
    n_heads = _require(hf, "num_attention_heads")
    if hf.get("tie_word_embeddings"):
        raise ConfigError("Dream config with tie_word_embeddings=true is not supported (public checkpoints are untied)")
    return DLMConfig(
        model_type=DREAM,
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=_require(hf, "hidden_size"),
        intermediate_size=_require(hf, "intermediate_size"),
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=_require(hf, "num_key_value_heads") if hf.get("num_key_value_heads") else n_heads,
        rope_theta=_number(float, "rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=_number(float, "rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_number(int, "max_position_embeddings", hf.get("max_position_embeddings", 32768)),
        mask_token_id=_require(hf, "mask_token_id"),
        qkv_bias=True,
        explicit_head_dim=_optional_int(hf, "head_dim"),
        bos_token_id=_optional_int(hf, "bos_token_id"),
        eos_token_id=(_eos_ids(hf) or (None,))[0],
        pad_token_id=_optional_int(hf, "pad_token_id"),
        eos_token_ids=_eos_ids(hf),
        hf_config=dict(hf),
    )


def _native_skeleton(config: DLMConfig) -> dict[str, Any]:
    """Fixed keys of a fresh config.json for a model not loaded from a checkpoint."""
    if config.model_type == LLADA:
        return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
                "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
                "weight_tying": False, "use_cache": False}
    return {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
            "tie_word_embeddings": False, "use_cache": False}


def _native_values(config: DLMConfig) -> dict[str, Any]:
    common = {"rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps, "head_dim": config.explicit_head_dim,
              "mask_token_id": config.mask_token_id, "bos_token_id": config.bos_token_id,
              "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_id,
              "pad_token_id": config.pad_token_id}
    if config.model_type == LLADA:
        return {**common, "d_model": config.hidden_size, "n_heads": config.num_heads,
                "n_kv_heads": config.num_kv_heads, "n_layers": config.num_layers,
                "mlp_hidden_size": config.intermediate_size, "vocab_size": config.vocab_size,
                "embedding_size": config.vocab_size, "include_bias": False,
                "max_sequence_length": config.max_position_embeddings}
    return {**common, "hidden_size": config.hidden_size, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "num_hidden_layers": config.num_layers,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings}
