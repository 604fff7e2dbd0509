"""The Serve application: a dense and a pruned `ModelReplica` behind one `ABRouter`.

    serve run serve.app:build_app model=embedded pruned=runs/pruned
    serve run deploy/serve.yaml

Arguments are typed (pydantic), so a typo in a config fails at start with the
field named. Each variant's `ray_actor_options` ask for a GPU when its device is
CUDA. The largest `max_tokens` a request may ask is what every variant's model can
generate (its sequence, prompt included, minus one prompt token), read from the models'
configs when the app is built, and at most `max_tokens` if given.
"""
from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from serve.api.guards import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_READING_REQUESTS
from serve.api.schemas import MAX_TOKENS_LIMIT
from serve.decisions.router_config import CanaryPolicy, CostSettings, QualitySettings, RouterSettings
from serve.engine.config import EngineConfig
from serve.ingress import ABRouter
from serve.replica import ModelReplica

log = logging.getLogger("ray.serve")
# Serve hands the router more requests than it serves at once (quick refusals, health probes)
ROUTER_SLACK = 64


class VariantArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="'embedded', a local HF model directory, or a pruned artifact")
    device: str = "cpu"
    dtype: str | None = None
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0, description="Ray logical CPUs per replica (scheduling only)")
    engine: dict = Field(default_factory=dict, description="EngineConfig fields (max_num_seqs, max_queue, ...)")
    sparse_backend: str | None = Field(None, description="force a 2:4 backend (dense, triton, cusparselt, cutlass)")


class AppArgs(BaseModel):
    """`model` is the dense variant; `pruned` its artifact. More variants can be given in `variants`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field("embedded", description="dense variant's model (shorthand for variants.dense.model)")
    pruned: str | None = Field(None, description="pruned variant's artifact (shorthand for variants.pruned.model)")
    variants: dict[str, VariantArgs] = Field(default_factory=dict)
    device: str = "cpu"
    model_name: str = "sinkserve"
    weights: dict[str, float] | None = None
    sticky: bool = True
    shadow: bool = False
    quality: QualitySettings | None = Field(None, description="paired quality checks (the router's user_config)")
    cost: CostSettings | None = Field(None, description="prices per replica-hour for the live cost gauge")
    canary: CanaryPolicy | None = Field(None, description="a rollout policy for the pruned variant")
    request_timeout_s: float = Field(300.0, gt=0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT,
                                   description="largest max_tokens a request may ask (default: what the models' "
                                   f"sequence allows, at most {MAX_TOKENS_LIMIT}; the OpenAPI document says it)")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, description="request bodies over it get 413")
    body_timeout_s: float = Field(DEFAULT_BODY_TIMEOUT_S, gt=0, le=3600, description="a request's body must arrive "
                                  "whole within this many seconds of the request reaching the router, else 408")
    max_reading_requests: int = Field(DEFAULT_MAX_READING_REQUESTS, ge=1, description="requests one router replica "
                                      "holds while their bodies arrive; beyond it, 429 with Retry-After")
    max_concurrent_requests: int = Field(512, ge=1, description="generation requests one router replica holds at "
                                         "once; beyond it, 429 with Retry-After")
    max_queued_requests: int = Field(512, ge=1, description="backlog in Serve's proxy before it answers 503 itself "
                                     "(reached only past max_concurrent_requests)")

    @model_validator(mode="after")
    def _fill_variants(self) -> "AppArgs":
        if self.model and "dense" not in self.variants:
            self.variants["dense"] = VariantArgs(model=self.model, device=self.device)
        if self.pruned and "pruned" not in self.variants:
            self.variants["pruned"] = VariantArgs(model=self.pruned, device=self.device)
        if not self.variants:
            raise ValueError("no variant configured: give model=... (and pruned=...) or variants")
        return self


def model_sequence(variant: VariantArgs) -> int | None:
    """Prompt + max_tokens one sequence of this variant may hold, as its engine computes it
    (`DLMEngine._max_length`); None when the model's config cannot be read here (a model
    path that only exists on the GPU nodes of a cluster)."""
    from sinkprune.dlm.errors import ModelLoadError
    from sinkprune.dlm.loading import read_config, resolve_model_dir

    try:
        model_dir = resolve_model_dir(variant.model)
    except (ModelLoadError, OSError) as err:
        log.warning("cannot read the config of %s here (%s): the max_tokens ceiling is not checked against it",
                    variant.model, err)
        return None
    positions = read_config(model_dir).max_position_embeddings  # a config it cannot describe fails the build
    engine = EngineConfig(**variant.engine)
    return min(engine.max_tokens_per_step, positions, engine.max_model_len or positions)


def max_tokens_ceiling(config: AppArgs) -> tuple[int, int | None]:
    """(the largest max_tokens a request may ask, the shortest sequence of the variants or None).
    A prompt holds at least one token, so a sequence of N allows N - 1; an explicit `max_tokens`
    above that is refused here, when the app is built, not at the first request."""
    sequences = [s for s in map(model_sequence, config.variants.values()) if s is not None]
    sequence = min(sequences) if sequences else None
    ceiling = min(MAX_TOKENS_LIMIT, sequence - 1) if sequence else MAX_TOKENS_LIMIT
    if config.max_tokens is None:
        return ceiling, sequence
    if config.max_tokens > ceiling:
        raise ValueError(f"max_tokens {config.max_tokens}: the served models hold {sequence} tokens per sequence, "
                         f"prompt included, so at most {ceiling}")
    return config.max_tokens, sequence


def build_app(args: dict) -> Application:
    config = AppArgs.model_validate(args)
    max_tokens, max_sequence = max_tokens_ceiling(config)
    handles = {}
    for name, variant in config.variants.items():
        gpus = 1 if variant.device.startswith("cuda") else 0
        deployment = ModelReplica.options(
            name=f"ModelReplica-{name}", num_replicas=variant.num_replicas,
            ray_actor_options={"num_cpus": variant.num_cpus, "num_gpus": gpus})
        handles[name] = deployment.bind(name, variant.model, variant.device, variant.dtype, variant.engine,
                                        variant.sparse_backend)
    routing = {"weights": config.weights, "sticky": config.sticky, "shadow": config.shadow}
    routing |= {name: getattr(config, name).model_dump() for name in ("quality", "cost", "canary")
                if getattr(config, name) is not None}
    RouterSettings.model_validate(routing).check_variants(sorted(config.variants))  # fails the build, not a replica
    specs = {name: {"model": v.model, "device": v.device, "num_replicas": v.num_replicas}
             for name, v in config.variants.items()}
    # Serve hands the router more requests than it will hold, so the router refuses the excess itself;
    # requests still sending their bodies have slots of their own, so slow senders never queue others
    slots = config.max_concurrent_requests + config.max_reading_requests + ROUTER_SLACK
    router = ABRouter.options(max_ongoing_requests=slots, max_queued_requests=config.max_queued_requests,
                              user_config=routing,
                              ray_actor_options={"num_cpus": 0})  # I/O-bound: never blocks a model replica
    return router.bind(handles, config.model_name, routing, config.request_timeout_s, max_tokens,
                       config.max_body_bytes, max_concurrent_requests=config.max_concurrent_requests,
                       variant_specs=specs, body_timeout_s=config.body_timeout_s,
                       max_reading_requests=config.max_reading_requests, max_sequence=max_sequence)
