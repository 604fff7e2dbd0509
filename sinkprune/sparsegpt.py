"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix column by column and
compensate each pruned weight's error on the columns not yet visited, using
the inverse Hessian of the layer's inputs (H = X^T X).

Selection is by w^2 / [H^-1]_jj^2, made at the start of every group of M for
N:M and once per block of columns for unstructured sparsity. The unstructured
quota is tracked per row and cumulatively, so every row ends within one weight
of the requested ratio.
"""
from __future__ import annotations

import torch

from sinkprune.masks import Pattern


def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian; dead inputs get unit diagonal."""
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, block_size: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """The pruned (and error-compensated) weight, same shape and dtype as `weight`."""
    w = weight.float().clone()
    rows, cols = w.shape
    if pattern.kind == "nm" and (cols % pattern.m or block_size % pattern.m):
        raise ValueError(f"{cols} input features (and block size {block_size}) must be multiples of M={pattern.m}")
    hinv = _inverse_hessian_factor(hessian.to(w.device), w, damp)
    pruned_so_far = torch.zeros(rows, dtype=torch.long, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diag(hinv_block)
        errors = torch.zeros_like(block)
        prune = torch.zeros_like(block, dtype=torch.bool)
        if pattern.kind == "unstructured":
            quota = round(pattern.ratio * end) - pruned_so_far  # per row, cumulative: exact totals
            saliency = block.pow(2) / diag[None, :].pow(2)
            order = saliency.argsort(dim=1)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(end - start, device=w.device).expand_as(order))
            prune = ranks < quota[:, None]
            pruned_so_far += prune.sum(1)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = block[:, i:i + pattern.m].pow(2) / diag[i:i + pattern.m][None, :].pow(2)
                lowest = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                prune[:, i:i + pattern.m].scatter_(1, lowest, True)
            column = block[:, i]
            kept = column.masked_fill(prune[:, i], 0.0)
            error = (column - kept) / hinv_block[i, i]
            block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype)
