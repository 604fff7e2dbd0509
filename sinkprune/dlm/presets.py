"""The public configs of the full-size checkpoints (the fields that shape the weights).

They let code build a model of the real shapes on `meta` (shape checks) or with
random weights (speed measurements) where the checkpoints cannot be downloaded.
"""
from __future__ import annotations

from typing import Any

# config.json of GSAI-ML/LLaDA-8B-Base.
LLADA_8B: dict[str, Any] = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464,
    "max_sequence_length": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "include_bias": False,
    "weight_tying": False, "block_type": "llama", "mask_token_id": 126336, "eos_token_id": 126081,
    "pad_token_id": 126081,
}
# config.json of Dream-org/Dream-v0-Base-7B.
DREAM_7B: dict[str, Any] = {
    "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "mask_token_id": 151666, "pad_token_id": 151643, "bos_token_id": 151643,
    "eos_token_id": 151643,
}
PRESETS = {"llada-8b": LLADA_8B, "dream-7b": DREAM_7B}
