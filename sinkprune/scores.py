"""Pruning statistics: one small function per method, higher score = more important."""
from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, the L2 norm of input channel j over all calibration tokens.
    (Classic Wanda's root-mean-square differs only by a constant per layer.)"""
    return weight.abs().float() * input_sq_sum.float().sqrt()[None, :]
