"""Layer-by-layer calibration on clean or noised windows, with bounded memory.

A DLM sees partly masked inputs at every step, so calibration can run the
model on windows noised at a grid of timesteps (the paper's default: 50
diffusion steps sampled every 5, i.e. t = 1.0, 0.9, ..., 0.1); the reference
implementation calibrates its statistics on clean windows instead (see
`sinkprune.prune`, `calibration`).

Blocks are visited in order: the calibration inputs go through block i, the
statistics of its linear layers are gathered, the caller prunes the block, and
the inputs are pushed through the *pruned* block to become block i+1's inputs.
Only the hidden states and one block's statistics are alive at a time, and
the hidden states can live on the host or on disk (`sinkprune.hidden_store`),
so an 8B model prunes on one GPU (docs/CALIBRATION.md has the memory formula).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sinkprune.dlm.model import DiffusionLM
from sinkprune.hidden_store import HiddenStates


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
        squares = x.reshape(-1, x.shape[-1]).float().square()
        if row_weights is None:
            self.value += squares.sum(0).double()
        else:  # sum_t w_t^2 x_tj^2 as one vector-matrix product: no weighted copy of x
            self.value += (row_weights.reshape(1, -1).float().square() @ squares).squeeze(0).double()


class Hessian:
    """H = (X * w)^T (X * w) over calibration tokens: SparseGPT's statistic, in float32.

    When the model calibrates in bfloat16 (the dtype `--calibration-dtype auto` picks
    where the device multiplies it fastest), the inputs are bfloat16 values, and the
    product runs in the backend's reduced-precision float32 mode (`bfloat16_products`):
    bf16 multiplies, float32 accumulation and result. That is exact for the unweighted
    inputs and rounds the sink-weighted ones to bf16 before the product, so H stays the
    Gram matrix of (almost) the same X: symmetric positive semi-definite. (Rounding each
    batch's *product* to bf16 instead, 2^-9 per entry, broke positive definiteness on
    the embedded model: the Cholesky factorisation failed despite the 1% damping.)"""

    def __init__(self, features: int, device):
        self.value = torch.zeros((features, features), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1])
        bf16_inputs = x.dtype == torch.bfloat16
        x = x.float() if row_weights is None else x * row_weights.reshape(-1, 1).float()  # one op: promotes
        with bfloat16_products(x.device, bf16_inputs):
            self.value.addmm_(x.T, x)


@contextmanager
def bfloat16_products(device: torch.device, enabled: bool = True):
    """Within: float32 matmuls on `device` multiply in reduced precision and accumulate in
    float32 (oneDNN's bf16 mode on a CPU, about 2.6x the float32 rate on this project's AMX
    machine; TF32 on CUDA, whose 10-bit mantissa holds a bf16 value exactly). Only for
    inputs that are bf16 values already; the previous setting is restored."""
    modes = {"cpu": (torch.backends.mkldnn, "bf16"), "cuda": (torch.backends.cuda, "tf32")}
    kind = torch.device(device).type
    if not enabled or kind not in modes:
        yield
        return
    backend, mode = modes[kind]
    try:
        previous = backend.matmul.fp32_precision
        backend.matmul.fp32_precision = mode
    except (AttributeError, RuntimeError):  # an older torch, or TF32 set through the legacy flags: exact float32
        yield
        return
    try:
        yield
    finally:
        backend.matmul.fp32_precision = previous


STATISTICS: dict[str, type] = {"input_square_sum": InputSquareSum, "hessian": Hessian}


@torch.no_grad()
def calibrate_sequentially(
    model: DiffusionLM,
    samples: torch.Tensor,
    statistic: str | None,
    on_block: Callable[[int, nn.Module, dict[str, Statistic]], None],
    row_weights: torch.Tensor | None = None,
    batch_size: int = 8,
    hidden_states: str = "device",
    hidden_dir: str | None = None,
    progress: bool = False,
) -> None:
    """Walk the blocks in order; for each, gather `statistic` for its linears on
    the (already pruned-upstream) inputs, call `on_block(index, block, stats)`
    to prune it, then recompute the inputs of the next block.

    `samples` (N, L) are token windows (clean or noised); `row_weights` (N, L),
    if given, scale each token's activations in the statistics (sink-aware
    pruning). `statistic=None` gathers nothing (magnitude pruning). The hidden
    states between blocks live in `hidden_states` ("device", "host" or "disk",
    see `sinkprune.hidden_store`). Hidden states are kept in the model's dtype.
    """
    blocks = model.blocks
    if statistic is None:
        for index, block in enumerate(blocks):
            on_block(index, block, {})
        return
    device = model.embed_weight.device
    starts = range(0, len(samples), batch_size)
    chunks = [samples[lo:lo + batch_size].to(device) for lo in starts]
    weights = [None if row_weights is None else row_weights[lo:lo + batch_size].to(device) for lo in starts]
    inputs = _attention_inputs_by_shape(model)
    # every batch through every block once to gather, and through all but the last again after pruning
    bar = tqdm(total=len(chunks) * (2 * len(blocks) - 1), desc="calibrate blocks", unit="batch", disable=not progress)
    with HiddenStates(hidden_states, device, model.embed_weight.dtype, hidden_dir) as hidden:
        for chunk in chunks:
            hidden.append(model.embed(chunk))
        for index, block in enumerate(blocks):
            stats = _gather(block, chunks, weights, hidden, inputs, STATISTICS[statistic], device, bar)
            on_block(index, block, stats)
            del stats
            if index + 1 == len(blocks):
                break  # the last block's outputs feed nothing
            for i, chunk in enumerate(chunks):
                hidden[i] = block(hidden[i], inputs(chunk))[0]
                bar.update()
    bar.close()


def _attention_inputs_by_shape(model: DiffusionLM) -> Callable[[torch.Tensor], object]:
    """Rotary tables for unpadded batches depend on the batch's shape only: build each once."""
    cache: dict[tuple, object] = {}

    def inputs(chunk: torch.Tensor):
        if chunk.shape not in cache:
            cache[chunk.shape] = model.attention_inputs(chunk)
        return cache[chunk.shape]

    return inputs


def _gather(block, chunks, weights, hidden, inputs, make_stat, device, bar) -> dict[str, Statistic]:
    """One pass of every batch through `block`, adding each linear's input to its statistic.

    Linears that read the same tensor (q/k/v; gate/up) share one statistic,
    gathered once: it would be the same sum computed again."""
    linears = prunable_linears(block)
    stats: dict[str, Statistic] = {}
    current: dict = {"w": None, "seen": {}}

    def hook(name: str, features: int):
        def add(_module, args, _out):
            x, seen = args[0], current["seen"]
            if id(x) in seen:  # the entry holds x, so its id cannot be reused during this pass
                stats[name] = seen[id(x)][1]
                return
            stat = stats.setdefault(name, make_stat(features, device))
            stat.add(x, current["w"])
            seen[id(x)] = (x, stat)
        return add

    handles = [linear.register_forward_hook(hook(name, linear.in_features)) for name, linear in linears.items()]
    try:
        for i, (chunk, w) in enumerate(zip(chunks, weights)):
            current["w"], current["seen"] = w, {}
            block(hidden[i], inputs(chunk))
            bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return stats
