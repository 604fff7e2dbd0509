"""Layer-by-layer calibration on noised windows, with bounded memory.

A DLM sees partly masked inputs at every step, so calibration runs the model on
windows noised at a grid of timesteps (the paper's default: 50 diffusion steps
sampled every 5, i.e. t = 1.0, 0.9, ..., 0.1) rather than on clean text.

Blocks are visited in order: the calibration inputs go through block i, the
statistics of its linear layers are gathered, the caller prunes the block, and
the inputs are pushed through the *pruned* block to become block i+1's inputs.
Only the hidden states and one block's statistics are alive at a time, so an
8B model prunes on one GPU.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sinkprune.dlm.model import DiffusionLM


def default_timesteps(diffusion_steps: int = 50, every: int = 5) -> list[float]:
    return [1 - i / diffusion_steps for i in range(0, diffusion_steps, every)]


def blocks_prefix(model: DiffusionLM) -> str:
    """The qualified name of the model's block list (`model.transformer.blocks`, `model.layers`)."""
    return next(name for name, m in model.named_modules() if m is model.blocks)


def prunable_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every linear layer inside `module` (a block, or a model's blocks), by qualified name."""
    if isinstance(module, DiffusionLM):
        prefix = blocks_prefix(module)
        module = module.blocks
    return {f"{prefix}.{name}" if prefix else name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class Statistic(Protocol):
    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None) -> None: ...


class InputSquareSum:
    """Sum over calibration tokens of (w * x_j)^2 per input channel: Wanda's statistic."""

    def __init__(self, features: int, device):
        self.value = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if row_weights is not None:
            x = x * row_weights.reshape(-1, 1).to(x)
        self.value += x.pow(2).sum(0).double()


class Hessian:
    """H = (X * w)^T (X * w) over calibration tokens: SparseGPT's statistic."""

    def __init__(self, features: int, device):
        self.value = torch.zeros((features, features), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if row_weights is not None:
            x = x * row_weights.reshape(-1, 1).to(x)
        self.value += x.T @ x


STATISTICS: dict[str, type] = {"input_square_sum": InputSquareSum, "hessian": Hessian}


@torch.no_grad()
def calibrate_sequentially(
    model: DiffusionLM,
    samples: torch.Tensor,
    statistic: str | None,
    on_block: Callable[[int, nn.Module, dict[str, Statistic]], None],
    row_weights: torch.Tensor | None = None,
    batch_size: int = 8,
    storage_device: str | torch.device | None = None,
    progress: bool = False,
) -> None:
    """Walk the blocks in order; for each, gather `statistic` for its linears on
    the (already pruned-upstream) inputs, call `on_block(index, block, stats)`
    to prune it, then recompute the inputs of the next block.

    `samples` (N, L) are noised token windows; `row_weights` (N, L), if given,
    scale each token's activations in the statistics (sink-aware pruning).
    `statistic=None` gathers nothing (magnitude pruning). Hidden states may be
    kept on `storage_device` (e.g. "cpu") to save accelerator memory.
    """
    device = model.embed_weight.device
    storage = torch.device(storage_device) if storage_device is not None else device
    chunks = [samples[lo:lo + batch_size] for lo in range(0, len(samples), batch_size)]
    weights = [None if row_weights is None else row_weights[lo:lo + batch_size]
               for lo in range(0, len(samples), batch_size)]
    hidden = [model.embed(chunk.to(device)).to(storage) for chunk in chunks] if statistic else []
    for index, block in enumerate(tqdm(model.blocks, desc="prune blocks", disable=not progress)):
        if statistic is None:
            on_block(index, block, {})
            continue
        stats = _gather(model, block, chunks, weights, hidden, STATISTICS[statistic], device)
        on_block(index, block, stats)
        del stats
        for i, chunk in enumerate(chunks):
            inputs = model.attention_inputs(chunk.to(device))
            hidden[i] = block(hidden[i].to(device), inputs)[0].to(storage)


def _gather(model, block, chunks, weights, hidden, make_stat, device) -> dict[str, Statistic]:
    linears = prunable_linears(block)
    stats = {name: make_stat(linear.in_features, device) for name, linear in linears.items()}
    current: dict[str, torch.Tensor | None] = {"w": None}

    def hook(name):
        return lambda _m, args, _out: stats[name].add(args[0], current["w"])

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        for chunk, w, h in zip(chunks, weights, hidden):
            current["w"] = None if w is None else w.to(device)
            block(h.to(device), model.attention_inputs(chunk.to(device)))
    finally:
        for handle in handles:
            handle.remove()
    return stats
