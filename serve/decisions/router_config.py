"""The router's `user_config`: routing, online quality, live cost and the canary policy.

Typed and strict (pydantic, unknown keys refused), so a typo in `serve deploy`'s
config fails the deploy with the field named instead of being silently ignored.
Everything here can change live (`reconfigure`), without restarting a replica.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class QualitySettings(_Strict):
    """Paired quality checks: a sampled user request also runs on the other variant, and the
    reference (dense) replica scores both answers."""

    sample_rate: float = Field(0.0, ge=0, le=1, description="share of user requests checked (shadow: true = 1)")
    reference: str = Field("dense", description="the variant whose model scores both answers")
    samples: int = Field(8, ge=1, le=128, description="Monte-Carlo mask samples per scored answer")
    max_busy: int = Field(0, ge=0, description="a replica with more requests than this drops the check (counted)")
    max_in_flight: int = Field(1, ge=1, description="checks running at once; more are dropped (counted)")


class CostSettings(_Strict):
    """Prices per replica-hour; the live cost per million output tokens divides them by the
    output throughput measured over the last `window_s`."""

    cpu_replica_hour: float = Field(0.0, ge=0, description="price of one CPU replica for an hour")
    gpu_replica_hour: float = Field(0.0, ge=0, description="price of one GPU replica for an hour")
    window_s: float = Field(60.0, gt=0, le=3600)


class Gates(_Strict):
    """What the candidate must hold on live traffic at every step; null turns a gate off."""

    max_error_rate: float | None = Field(0.01, ge=0, le=1, description="share of error/unavailable/timeout")
    max_p99_latency_ratio: float | None = Field(1.5, gt=0, description="candidate p99 / baseline p99")
    max_quality_gap: float | None = Field(0.5, description="mean paired NLL gap, nats per token")
    min_agreement: float | None = Field(None, ge=0, le=1, description="mean token agreement with the baseline")
    max_cost_ratio: float | None = Field(None, gt=0, description="candidate / baseline live cost per 1M tokens")
    confidence_z: float = Field(2.0, ge=0, description="standard errors by which a measured mean (error rate, "
                                "quality gap, agreement) must clear its limit to pass, or miss it to fail; "
                                "in between the step waits for more data. 0: decide on the mean alone")


class CanaryPolicy(_Strict):
    """Steps of the candidate's traffic share; a step is promoted once it has `min_requests`
    and `min_seconds` (and `min_pairs` quality checks when the quality gate is on) and every
    gate holds; any gate that fails on its minimum of data rolls the candidate back to 0."""

    variant: str = "pruned"
    baseline: str = "dense"
    steps: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.25, 0.5, 1.0], min_length=1)
    min_requests: int = Field(50, ge=1)
    min_seconds: float = Field(60.0, ge=0)
    min_pairs: int = Field(10, ge=1)
    gates: Gates = Field(default_factory=Gates)

    @model_validator(mode="after")
    def _check(self) -> "CanaryPolicy":
        if self.variant == self.baseline:
            raise ValueError("canary: variant and baseline must differ")
        if any(not 0 < s <= 1 for s in self.steps) or self.steps != sorted(set(self.steps)):
            raise ValueError(f"canary.steps must rise strictly within (0, 1], got {self.steps}")
        return self


class RouterSettings(_Strict):
    weights: dict[str, float] | None = None
    sticky: bool = True
    shadow: bool = False
    salt: str = "sinkserve"
    quality: QualitySettings = Field(default_factory=QualitySettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    canary: CanaryPolicy | None = None
    tick_s: float = Field(2.0, gt=0, le=60, description="how often cost and the canary are evaluated")

    @model_validator(mode="after")
    def _check(self) -> "RouterSettings":
        if self.weights is not None:
            negative = {name: w for name, w in self.weights.items() if w < 0}
            if negative:
                raise ValueError(f"weights must be >= 0, got {negative}")
            if self.weights and not any(self.weights.values()):
                raise ValueError("weights are all 0: no variant would get traffic")
        if self.canary is not None and self.weights is not None:
            raise ValueError("weights and canary are both set: the canary sets the weights (remove one)")
        if self.canary is not None and self.canary.variant == self.quality.reference:
            raise ValueError(f"canary.variant {self.canary.variant!r} is the quality reference: the reference "
                             "scores the candidate, so they must differ")
        return self

    def check_variants(self, variants: list[str]) -> None:
        """Names must be deployed variants (checked at deploy, not at the first request)."""
        named = set(self.weights or {})
        if self.quality_rate():
            named.add(self.quality.reference)
        if self.canary:
            named |= {self.canary.variant, self.canary.baseline}
        unknown = sorted(named - set(variants))
        if unknown:
            raise ValueError(f"router config names unknown variants {unknown}; deployed: {variants}")

    def quality_rate(self) -> float:
        return 1.0 if self.shadow else self.quality.sample_rate
