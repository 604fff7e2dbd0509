"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix column by column and
compensate each pruned weight's error on the columns not yet visited, using
the inverse Hessian of the layer's inputs (H = X^T X).

Selection is by w^2 / [H^-1]_jj^2, made at the start of every group of M for
N:M and once per block of columns for unstructured sparsity. The unstructured
quota is tracked per row and cumulatively, so every row ends within one weight
of the requested ratio.

Rows are independent given H: the weights of several linears that read the same
input (q/k/v, gate/up) can be stacked and pruned in one call, which gives each
the result it would get alone and inverts H once (`sinkprune.prune` does this).

The column loop is the solver's cost on small layers: one iteration per input
feature, each a few tensor operations. It works on the transposed weight (a
column is a contiguous row) and does two operations per column: the error of the
column (weights to prune over their inverse-Hessian diagonal) and one rank-1
update of the block's remaining columns (`addr_`); the pruned weights are set to
exact zeros once per block.
"""
from __future__ import annotations

import torch

from sinkprune.masks import Pattern


def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian; dead inputs get unit diagonal
    and their weights (columns of `weight`, modified in place) are zeroed."""
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
    wt = w.T.contiguous()  # (cols, rows): column j of the weight is the contiguous row wt[j]
    pruned_so_far = torch.zeros(rows, dtype=torch.long, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end]  # a view: updated in place
        hinv_block = hinv[start:end, start:end]
        diag = hinv_block.diagonal()[:, None]
        errors = torch.empty_like(block)
        prune = torch.zeros_like(block, dtype=torch.bool)
        # per column: the share of each weight that becomes its error (1 / [H^-1]_jj where pruned, else 0)
        coefficient = torch.zeros_like(block)
        if pattern.kind == "unstructured":
            quota = round(pattern.ratio * end) - pruned_so_far  # per row, cumulative: exact totals
            saliency = block.square() / diag.square()
            order = saliency.argsort(dim=0)
            ranks = torch.empty_like(order).scatter_(
                0, order, torch.arange(end - start, device=w.device)[:, None].expand_as(order))
            prune = ranks < quota[None, :]
            pruned_so_far += prune.sum(0)
            torch.div(prune, diag, out=coefficient)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = block[group].square() / diag[group].square()
                lowest = saliency.topk(pattern.m - pattern.n, dim=0, largest=False).indices
                prune[group].scatter_(0, lowest, True)
                torch.div(prune[group], diag[group], out=coefficient[group])
            torch.mul(block[i], coefficient[i], out=errors[i])
            block[i:].addr_(hinv_block[i, i:], errors[i], alpha=-1)  # column i itself becomes its kept part
        block.masked_fill_(prune, 0.0)  # exact zeros where the update left rounding residue
        if end < cols:
            wt[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)
    return wt.T.contiguous().to(weight.dtype)
