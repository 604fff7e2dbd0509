"""Applying a pruning method and pattern to a model's linear layers, in place."""
from __future__ import annotations

import torch

from sinkprune.calibration import prunable_linears
from sinkprune.masks import Pattern, make_mask
from sinkprune.scores import magnitude_score, wanda_score

METHODS = ("magnitude", "wanda")


@torch.no_grad()
def prune_model(
    model, method: str, pattern: Pattern, input_sq_sums: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Zero the pruned weights of every prunable linear; returns the sparsity per layer."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "magnitude" and input_sq_sums is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    sparsity = {}
    for name, linear in prunable_linears(model).items():
        weight = linear.weight
        if method == "magnitude":
            scores = magnitude_score(weight)
        else:
            scores = wanda_score(weight, input_sq_sums[name].to(weight.device))
        weight.mul_(make_mask(scores, pattern).to(weight.dtype))
        sparsity[name] = float((weight == 0).float().mean())
    return sparsity
