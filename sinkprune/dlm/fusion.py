"""Fewer, bigger matmuls for serving: q/k/v as one projection and gate/up as one.

Each module of a model that names `fusions` ({fused name: (linear names)}: the blocks of LLaDA, Dream's
attention and MLP) gets one `FusedLinear` whose weight stacks the linears' output rows; the separate
linears are removed, so the weights are held once. The outputs are the same numbers (each output row is
the same dot product), fewer kernels are launched per step, and the GEMMs are wider, which small batches
need on a GPU. 2:4 groups run along the input dimension, so a stack of 2:4 weights is 2:4: fuse before
the sparse swap (the dispatch is then measured on the fused shapes). A replica fuses an artifact's layers
as loaded, packed (`Packed24Linear`), without unpacking them. Serving only: a fused model no longer has
the per-role linears that pruning, calibration and artifact writing walk, and fusing twice is a no-op.
"""
from __future__ import annotations

import torch
from torch import nn

from sinkprune.dlm.layers import FusedLinear


def stack_linears(linears: list[nn.Module], name: str) -> nn.Module:
    """One linear computing every one of `linears` (same input size, dtype, device) at once. A packed layer
    fused with plain ones is unpacked (`to_linear`; a checkpoint that compressed only some of them): the stack
    is then a plain linear, served dense unless it happens to be 2:4."""
    if any(type(linear) is nn.Linear for linear in linears):
        linears = [linear.to_linear() if hasattr(linear, "to_linear") else linear for linear in linears]
    if all(type(linear) is nn.Linear for linear in linears):
        first = linears[0]
        if any(linear.in_features != first.in_features for linear in linears):
            raise ValueError(f"{name}: linears of different input sizes cannot be fused")
        has_bias = any(linear.bias is not None for linear in linears)
        fused = nn.Linear(first.in_features, sum(linear.out_features for linear in linears), bias=has_bias,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
            if has_bias:
                fused.bias.copy_(torch.cat([linear.bias if linear.bias is not None
                                            else linear.weight.new_zeros(linear.out_features) for linear in linears]))
        return fused
    kind = type(linears[0])
    if all(type(linear) is kind for linear in linears) and hasattr(kind, "stack"):
        return kind.stack(linears, name=name)
    raise ValueError(f"{name}: cannot fuse {', '.join(sorted({type(linear).__name__ for linear in linears}))}")


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse every group a module of `model` declares in `fusions`; returns the fused modules' names. The
    owners are listed by name, so each group's separate linears are freed as soon as it is fused."""
    fused_names = []
    owners = [name for name, module in model.named_modules() if getattr(module, "fusions", None)]
    for module_name in owners:
        module = model.get_submodule(module_name)
        for fused_name, names in module.fusions.items():
            if getattr(module, fused_name, None) is not None:
                continue
            full = f"{module_name}.{fused_name}" if module_name else fused_name
            linears = [getattr(module, name) for name in names]
            fused = stack_linears(linears, full)
            setattr(module, fused_name, FusedLinear(fused, tuple(linear.out_features for linear in linears)))
            for name in names:
                delattr(module, name)
            fused_names.append(full)
    return fused_names
