"""Pruning a diffusion LM in place: method x pattern, layer by layer.

Methods: `magnitude`, `wanda`, `sparsegpt`, and the sink-aware variants
`sink-wanda` / `sink-sparsegpt` (arXiv 2602.17664), which down-weight each
token's activations by (1 - sink score) before the statistic is taken, so that
attention-sink positions do not dominate what is judged important.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sinkprune.calibration import blocks_prefix, calibrate_sequentially, default_timesteps, prunable_linears
from sinkprune.dlm.diffusion import noise_at_timesteps
from sinkprune.dlm.model import DiffusionLM
from sinkprune.masks import Pattern, make_mask, parse_pattern
from sinkprune.scores import magnitude_score, wanda_score
from sinkprune.sink_scores import DEFAULT_ALPHA, DEFAULT_K, window_sink_scores
from sinkprune.sparsegpt import sparsegpt_prune
from sinkprune.structured import prune_block_structured

METHODS = ("magnitude", "wanda", "sparsegpt", "sink-wanda", "sink-sparsegpt")
STATISTIC_OF = {"magnitude": None, "wanda": "input_square_sum", "sparsegpt": "hessian"}
STRUCTURED_METHODS = ("magnitude", "wanda", "sink-wanda")


@dataclass
class PruneSettings:
    method: str
    pattern: str
    timesteps: list[float] = field(default_factory=default_timesteps)
    seed: int = 0
    k: float = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prune_linear(linear: nn.Linear, method: str, pattern: Pattern, stat: torch.Tensor | None) -> None:
    """Prune one layer in place with the base method (sink-awareness lives in `stat`)."""
    base = method.removeprefix("sink-")
    weight = linear.weight
    if base == "sparsegpt":
        weight.copy_(sparsegpt_prune(weight, stat, pattern))
        return
    scores = magnitude_score(weight) if base == "magnitude" else wanda_score(weight, stat.to(weight.device))
    weight.mul_(make_mask(scores, pattern).to(weight.dtype))


@torch.no_grad()
def prune_model(
    model: DiffusionLM,
    settings: PruneSettings,
    calibration_windows: torch.Tensor | None = None,
    sink_scores: torch.Tensor | None = None,
    storage_device: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Prune every linear of every block; returns the sparsity per layer.

    `sink_scores` (windows, seq) may be given to reuse or control them; by
    default sink-aware methods compute them on the dense model first.
    """
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")
    pattern = parse_pattern(settings.pattern)
    if pattern.kind == "structured" and settings.method not in STRUCTURED_METHODS:
        raise ValueError(f"structured pruning supports {', '.join(STRUCTURED_METHODS)}, not {settings.method!r}")
    statistic = STATISTIC_OF[settings.method.removeprefix("sink-")]
    if statistic is not None and calibration_windows is None:
        raise ValueError(f"method {settings.method!r} needs calibration windows")
    samples = row_weights = None
    if statistic is not None:
        noisy = noise_at_timesteps(calibration_windows, settings.timesteps, model.config.mask_token_id, settings.seed)
        samples = noisy.flatten(0, 1)  # (timesteps * windows, seq)
        if settings.method.startswith("sink-"):
            if sink_scores is None:
                sink_scores = window_sink_scores(model, calibration_windows, settings.timesteps, settings.seed,
                                                 settings.k, settings.alpha, progress=progress)
            row_weights = (1 - sink_scores).repeat(len(settings.timesteps), 1)
    sparsity: dict[str, float] = {}
    prefix = blocks_prefix(model)

    def prune_block(index: int, block: nn.Module, stats: dict) -> None:
        if pattern.kind == "structured":
            roles = model.linear_roles
            role_stats = {role: stats[roles[role]].value if stats else None for role in ("down", "o")}
            kept = prune_block_structured(block, roles, model.attention_path, pattern.ratio, role_stats)
            sparsity[f"{prefix}.{index}"] = 1 - kept["mlp_channels_kept"]
            return
        for name, linear in prunable_linears(block).items():
            prune_linear(linear, settings.method, pattern, stats[name].value if stats else None)
            sparsity[f"{prefix}.{index}.{name}"] = float((linear.weight == 0).float().mean())

    calibrate_sequentially(model, samples if samples is not None else torch.zeros(0, 1, dtype=torch.long),
                           statistic, prune_block, row_weights, settings.batch_size, storage_device, progress)
    if pattern.kind == "structured":
        _shrink_config(model)
    return sparsity


def _shrink_config(model: DiffusionLM) -> None:
    """Describe the sliced model: every block now has the same, smaller, sizes."""
    block = model.blocks[0]
    attention = block.get_submodule(model.attention_path) if model.attention_path else block
    down = block.get_submodule(model.linear_roles["down"])
    model.config = dataclasses.replace(
        model.config, intermediate_size=down.in_features, num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads, explicit_head_dim=model.config.head_dim)
