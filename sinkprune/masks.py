"""Sparsity patterns: which weights to keep, given a score per weight (higher = keep)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """`unstructured:<ratio>` (pruned per output row) or `N:M` (N kept of every M consecutive inputs)."""

    kind: str  # "unstructured" | "nm" | "structured"
    ratio: float = 0.0  # fraction pruned, for unstructured
    n: int = 0  # kept per group, for N:M
    m: int = 0

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m if self.kind == "nm" else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.kind}:{self.ratio:g}"


def parse_pattern(spec: str) -> Pattern:
    """Parse `2:4`, `4:8` or `unstructured:0.5`; raises ValueError naming the problem."""
    spec = spec.strip()
    if match := re.fullmatch(r"(unstructured|structured):([0-9.]+)", spec):
        ratio = float(match.group(2))
        if not 0 < ratio < 1:
            raise ValueError(f"pattern {spec!r}: the {match.group(1)} ratio must be in (0, 1)")
        return Pattern(match.group(1), ratio=ratio)
    if match := re.fullmatch(r"(\d+):(\d+)", spec):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {spec!r}: N:M needs 0 < N < M (N weights kept of every M)")
        return Pattern("nm", n=n, m=m)
    raise ValueError(f"unknown pattern {spec!r}: use N:M (e.g. 2:4), unstructured:<ratio> or structured:<ratio>")


def unstructured_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep mask removing the lowest-scoring `ratio` of each output row (Wanda's comparison group)."""
    drop = int(scores.shape[1] * ratio)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        lowest = scores.topk(drop, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the `n` highest scores of every `m` consecutive input weights."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def make_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.kind == "unstructured":
        return unstructured_mask(scores, pattern.ratio)
    return nm_mask(scores, pattern.n, pattern.m)


def follows_pattern(weight: torch.Tensor, pattern: Pattern) -> bool:
    """True if no group of M holds more than N non-zeros (N:M), for validating artifacts."""
    if pattern.kind != "nm":
        return True
    rows, cols = weight.shape
    if cols % pattern.m:
        return False
    return bool(((weight.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(-1) <= pattern.n).all())


def check_pattern_fits(pattern: Pattern, linears: dict[str, torch.nn.Linear]) -> None:
    """Raise ValueError naming the first layer whose input features an N:M pattern does not divide
    (checked before any calibration: a 2:3 pattern on a 1024-wide layer fails here, not an hour later)."""
    if pattern.kind != "nm":
        return
    for name, linear in linears.items():
        features = linear.in_features
        if features % pattern.m:
            raise ValueError(f"pattern {pattern} does not fit layer {name}: its {features} input features "
                             f"are not a multiple of M={pattern.m}")
