"""Sink scores: how much each position of a calibration window acts as an attention sink.

Units follow the reference implementation: the attention mass of a position is
the raw sum of softmax probabilities it receives over heads and query positions,
accumulated over layers (scale heads x queries x layers). The score
`sigmoid(alpha * (mass - (mean + k * std)))` over the sequence's positions is
then close to a hard threshold at mean + k std; with normalised shares it would
sit near 0.5 everywhere and the method would do nothing.
"""
from __future__ import annotations

import torch

from sinkprune.dlm.model import DiffusionLM
from sinkprune.sinks import collect_attention_mass

DEFAULT_K = 2.0
DEFAULT_ALPHA = 5.0


def sink_scores_from_mass(mass: torch.Tensor, k: float = DEFAULT_K, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Score per position from layer-summed mass (..., seq); statistics over the last axis."""
    mean = mass.mean(-1, keepdim=True)
    std = mass.std(-1, unbiased=False, keepdim=True)
    return torch.sigmoid(alpha * (mass - (mean + k * std)))


def timestep_sink_scores(
    model: DiffusionLM,
    windows: torch.Tensor,
    timesteps: list[float],
    seed: int = 0,
    k: float = DEFAULT_K,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Sink score per (timestep, window, position), each from that noised input's own mass."""
    mass = collect_attention_mass(model, windows, timesteps, seed, batch_size, progress, sum_layers=True)
    return sink_scores_from_mass(mass, k, alpha)

