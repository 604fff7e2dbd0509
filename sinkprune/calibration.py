"""Calibration statistics gathered on noised calibration windows.

A DLM sees partly masked inputs at every step, so calibration runs the model on
windows noised at a grid of timesteps (the paper's default: 50 diffusion steps
sampled every 5, i.e. t = 1.0, 0.9, ..., 0.1) rather than on clean text.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from sinkprune.dlm.diffusion import add_noise
from sinkprune.dlm.model import DiffusionLM


def default_timesteps(diffusion_steps: int = 50, every: int = 5) -> list[float]:
    return [1 - i / diffusion_steps for i in range(0, diffusion_steps, every)]


def prunable_linears(model: DiffusionLM) -> dict[str, nn.Linear]:
    """Every linear layer inside the transformer blocks (not the embedding or LM head)."""
    blocks_prefix = next(name for name, module in model.named_modules() if module is model.blocks)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(blocks_prefix + ".")}


@torch.no_grad()
def input_square_sums(
    model: DiffusionLM,
    windows: torch.Tensor,
    timesteps: list[float],
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per prunable linear: sum over all calibration tokens of x_j^2 per input channel (float64)."""
    linears = prunable_linears(model)
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64) for name, module in linears.items()}

    def hook(name):
        def accumulate(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.pow(2).sum(0).cpu()
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    protect = torch.zeros_like(windows, dtype=torch.bool)
    protect[:, 0] = True
    device = model.embed_weight.device
    try:
        for i, t in enumerate(tqdm(timesteps, desc="calibration", disable=not progress)):
            noisy, _, _ = add_noise(windows, t, model.config.mask_token_id,
                                    generator=torch.Generator().manual_seed(seed * 1009 + i), protect=protect)
            for lo in range(0, len(noisy), batch_size):
                model(noisy[lo:lo + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums
