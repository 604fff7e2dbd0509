"""A/B assignment: weighted, sticky per user, with fallback when a variant is down.

A user id is hashed with SHA-256 (stable across processes and restarts, unlike
Python's `hash`) to a point in [0, 1); the variants' weights cut [0, 1) into
consecutive ranges in a fixed (sorted) order, so a user keeps their variant as
long as the weights do not change. Requests without a user id get a random point.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoutingConfig:
    weights: dict[str, float]
    sticky: bool = True
    salt: str = "sinkserve"  # change to reshuffle every user

    def __post_init__(self):
        if not self.weights:
            raise ValueError("routing weights: at least one variant is needed")
        bad = {k: w for k, w in self.weights.items() if not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise ValueError(f"routing weights must be numbers >= 0, got {bad}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("routing weights: at least one weight must be > 0")


def user_point(user: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Router:
    config: RoutingConfig
    rng: random.Random = field(default_factory=random.Random)

    def choose(self, user: str | None, down: frozenset[str] = frozenset()) -> tuple[str, bool]:
        """The variant for this request and whether it is a fallback (its own was down)."""
        point = user_point(user, self.config.salt) if user and self.config.sticky else self.rng.random()
        primary = self._variant_at(point, self.config.weights)
        if primary not in down:
            return primary, False
        alive = {v: w for v, w in self.config.weights.items() if v not in down}
        if not alive or sum(alive.values()) <= 0:
            alive = {v: 1.0 for v in self.config.weights if v not in down}
        if not alive:
            return primary, False  # nothing is up: let the primary's error surface
        return self._variant_at(point, alive), True

    @staticmethod
    def _variant_at(point: float, weights: dict[str, float]) -> str:
        total = sum(weights.values())
        edge = 0.0
        names = sorted(weights)
        for name in names:
            edge += weights[name] / total
            if point < edge:
                return name
        return names[-1]
