"""Structured pruning: remove whole MLP channels and attention heads (key/value groups
for grouped-query attention), giving smaller dense matrices that run faster on any
hardware, CPU included.

Importance follows Wanda at the granularity of a channel: for MLP channel j,
||x_j|| * ||W_down[:, j]||, where x is the input of the down projection (the
SwiGLU output); for a head, the same summed over its channels of the output
projection's input. With `sink-wanda` the activations are weighted by
(1 - sink score) first, as in the unstructured methods; `magnitude` uses the
weight norms alone. Every layer keeps the same number of channels and heads, so
the model stays describable by one config.
"""
from __future__ import annotations

import torch
from torch import nn


def _get(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path) if path else block


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(block, parent), name, module)


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.data
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data)
    return out


def channel_importance(down: nn.Linear, input_sq_sum: torch.Tensor | None) -> torch.Tensor:
    """Per input channel of `down`: ||W[:, j]|| (times ||x_j|| when activations are known)."""
    score = down.weight.float().norm(dim=0)
    if input_sq_sum is not None:
        score = score * input_sq_sum.float().to(score.device).sqrt()
    return score


def keep_count(total: int, ratio: float) -> int:
    return max(1, round(total * (1 - ratio)))


@torch.no_grad()
def prune_block_structured(block: nn.Module, roles: dict[str, str], attention_path: str, ratio: float,
                           stats: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Slice one block in place; `stats` maps role ("down", "o") to its input statistic (or None)."""
    down = _get(block, roles["down"])
    mlp_keep = channel_importance(down, stats.get("down")).topk(keep_count(down.in_features, ratio)).indices.sort().values
    for role in ("gate", "up"):
        _set(block, roles[role], _sliced(_get(block, roles[role]), rows=mlp_keep))
    _set(block, roles["down"], _sliced(down, cols=mlp_keep))

    attention = _get(block, attention_path)
    heads, kv_heads = attention.num_heads, attention.num_kv_heads
    out_proj = _get(block, roles["o"])
    head_dim = out_proj.in_features // heads
    group = heads // kv_heads
    per_channel = channel_importance(out_proj, stats.get("o"))
    group_score = per_channel.view(kv_heads, group * head_dim).sum(-1)  # query heads sharing one K/V head
    kv_keep = group_score.topk(keep_count(kv_heads, ratio)).indices.sort().values
    q_heads = (kv_keep[:, None] * group + torch.arange(group, device=kv_keep.device)).flatten()
    q_channels = (q_heads[:, None] * head_dim + torch.arange(head_dim, device=kv_keep.device)).flatten()
    kv_channels = (kv_keep[:, None] * head_dim + torch.arange(head_dim, device=kv_keep.device)).flatten()
    _set(block, roles["q"], _sliced(_get(block, roles["q"]), rows=q_channels))
    _set(block, roles["k"], _sliced(_get(block, roles["k"]), rows=kv_channels))
    _set(block, roles["v"], _sliced(_get(block, roles["v"]), rows=kv_channels))
    _set(block, roles["o"], _sliced(out_proj, cols=q_channels))
    attention.num_heads, attention.num_kv_heads = len(q_heads), len(kv_keep)
    return {"mlp_channels_kept": len(mlp_keep) / down.in_features, "heads_kept": len(q_heads) / heads,
            "head_dim": head_dim}
