"""Random 2:4 weights, shared by the tests and the benchmark so both exercise the same kind of data."""
from __future__ import annotations

import torch


def random_24_weight(rows: int, cols: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     seed: int = 0) -> torch.Tensor:
    """A (rows, cols) weight with exactly 2 random non-zeros in every group of 4, scaled so x @ W^T stays O(1).
    Drawn on `device` (a model-sized weight takes seconds to draw on a CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, device=device) / (cols / 2) ** 0.5
    keep = torch.rand(rows, cols // 4, 4, generator=generator, device=device).argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, device=device).scatter_(-1, keep, 1.0).reshape(rows, cols)
    return (weight * mask + 0.0).to(dtype=dtype)
