"""Fixed-length token windows that start with BOS, for training, calibration and evaluation.

Real checkpoints see BOS first; a fixed first token is also what lets a small
model grow a stable attention sink, so every window here begins with it.
"""
from __future__ import annotations

import numpy as np
import torch


def token_stream(documents: list[str], tokenizer, batch: int = 512) -> np.ndarray:
    """All documents tokenised and joined with EOS, as one int32 array."""
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    for lo in range(0, len(documents), batch):
        encoded = tokenizer(documents[lo:lo + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def make_windows(stream: np.ndarray, seq_len: int, bos_id: int, limit: int | None = None) -> torch.Tensor:
    """Cut the stream into non-overlapping windows of `seq_len - 1` tokens, each
    prefixed with BOS: shape (windows, seq_len)."""
    body = seq_len - 1
    count = len(stream) // body
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise ValueError(f"text too short for one window of {seq_len} tokens ({len(stream)} tokens)")
    chunks = torch.from_numpy(stream[: count * body].astype(np.int64)).view(count, body)
    bos = torch.full((count, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, chunks], dim=1)
