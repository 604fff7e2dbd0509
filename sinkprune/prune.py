"""Pruning a diffusion LM in place: method x pattern, layer by layer.

Methods: `magnitude`, `wanda`, `sparsegpt`, and the sink-aware variants
`sink-wanda` / `sink-sparsegpt` (arXiv 2602.17664), which down-weight each
token's activations by (1 - sink score) before the statistic is taken, so that
attention-sink positions do not dominate what is judged important.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sinkprune.calibration import blocks_prefix, calibrate_sequentially, default_timesteps, prunable_linears
from sinkprune.choice import default_method
from sinkprune.dlm.diffusion import noise_at_timesteps
from sinkprune.dlm.model import DiffusionLM
from sinkprune.masks import Pattern, make_mask, parse_pattern
from sinkprune.scores import magnitude_score, wanda_score
from sinkprune.sink_scores import DEFAULT_ALPHA, DEFAULT_K, timestep_sink_scores
from sinkprune.sparsegpt import sparsegpt_prune
from sinkprune.structured import prune_block_structured

METHODS = ("magnitude", "wanda", "sparsegpt", "sink-wanda", "sink-sparsegpt")
# "auto": the method the project's own comparison measured best for the pattern (`sinkprune.choice`)
AUTO_METHOD = "auto"
STATISTIC_OF = {"magnitude": None, "wanda": "input_square_sum", "sparsegpt": "hessian"}
STRUCTURED_METHODS = ("magnitude", "wanda", "sink-wanda")
CALIBRATIONS = ("clean", "noised")
# "auto" calibration, per base method, by measurement (README, `sinkprune compare` on the embedded model at 2:4):
# Wanda's input norms lose less from clean windows, SparseGPT's Hessians less from noised ones
AUTO_CALIBRATION = {"magnitude": "clean", "wanda": "clean", "sparsegpt": "noised"}
SINK_WEIGHTINGS = ("mean", "per-timestep")


@dataclass
class PruneSettings:
    method: str
    pattern: str
    timesteps: list[float] = field(default_factory=default_timesteps)
    seed: int = 0
    k: float = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    batch_size: int = 8
    # statistics from clean windows (the reference's) or from windows noised at every timestep;
    # "auto" becomes the measured better one for the method (AUTO_CALIBRATION)
    calibration: str = "auto"
    # sink-aware methods: one score per position averaged over timesteps, or (noised calibration only)
    # each noised window weighted by its own timestep's score, as the reference's sink-aware Wanda does
    sink_weighting: str = "mean"
    # with method "auto": why the method was chosen (`sinkprune.choice`); it becomes the measured best for the pattern
    method_choice: str = ""

    def __post_init__(self):
        if self.method == AUTO_METHOD:
            try:
                self.method, calibration, self.method_choice = default_method(self.pattern)
            except ValueError:
                return  # a pattern that does not parse: check_settings names it
            if self.calibration == "auto" and self.sink_weighting == "mean":
                self.calibration = calibration
        if self.calibration == "auto" and self.method in METHODS:
            by_method = AUTO_CALIBRATION[self.method.removeprefix("sink-")]
            self.calibration = "noised" if self.sink_weighting == "per-timestep" else by_method

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prune_linear(linear: nn.Linear, method: str, pattern: Pattern, stat: torch.Tensor | None) -> None:
    """Prune one layer in place with the base method (sink-awareness lives in `stat`)."""
    base = method.removeprefix("sink-")
    weight = linear.weight
    if base == "sparsegpt":
        weight.copy_(sparsegpt_prune(weight, stat, pattern))
        return
    scores = magnitude_score(weight) if base == "magnitude" else wanda_score(weight, stat.to(weight.device))
    weight.mul_(make_mask(scores, pattern).to(weight.dtype))


@torch.no_grad()
def prune_linears(linears: list[nn.Linear], method: str, pattern: Pattern, stat: torch.Tensor | None) -> None:
    """Prune layers that read the same input (one statistic: q/k/v, gate/up) in place.

    SparseGPT's rows are independent given the Hessian, so their weights are stacked
    and solved in one call: the inverse Hessian is factored once and the column loop
    runs once instead of once per layer."""
    if method.removeprefix("sink-") != "sparsegpt" or len(linears) == 1:
        for linear in linears:
            prune_linear(linear, method, pattern, stat)
        return
    stacked = sparsegpt_prune(torch.cat([linear.weight for linear in linears]), stat, pattern)
    for linear, part in zip(linears, stacked.split([linear.out_features for linear in linears])):
        linear.weight.copy_(part)


@torch.no_grad()
def prune_model(
    model: DiffusionLM,
    settings: PruneSettings,
    calibration_windows: torch.Tensor | None = None,
    sink_scores: torch.Tensor | None = None,
    hidden_states: str = "device",
    hidden_dir: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Prune every linear of every block; returns the sparsity per layer.

    `sink_scores` may be given to reuse or control them: (windows, seq), the
    same at every timestep, or (timesteps, windows, seq); by default sink-aware
    methods compute them on the dense model first. `hidden_states` and
    `hidden_dir` say where calibration keeps its hidden states (`sinkprune.hidden_store`).
    """
    pattern = check_settings(settings)
    statistic = STATISTIC_OF[settings.method.removeprefix("sink-")]
    if statistic is not None and calibration_windows is None:
        raise ValueError(f"method {settings.method!r} needs calibration windows")
    samples = row_weights = None
    if statistic is not None:
        samples = calibration_windows
        if settings.calibration == "noised":
            noisy = noise_at_timesteps(calibration_windows, settings.timesteps, model.config.mask_token_id, settings.seed)
            samples = noisy.flatten(0, 1)  # (timesteps * windows, seq)
        if settings.method.startswith("sink-"):
            if sink_scores is None:
                sink_scores = timestep_sink_scores(model, calibration_windows, settings.timesteps, settings.seed,
                                                   settings.k, settings.alpha, settings.batch_size, progress)
            row_weights = sample_row_weights(sink_scores, settings)
    sparsity: dict[str, float] = {}
    prefix = blocks_prefix(model)

    def prune_block(index: int, block: nn.Module, stats: dict) -> None:
        if pattern.kind == "structured":
            roles = model.linear_roles
            role_stats = {role: stats[roles[role]].value if stats else None for role in ("down", "o")}
            kept = prune_block_structured(block, roles, model.attention_path, pattern.ratio, role_stats)
            sparsity[f"{prefix}.{index}"] = 1 - kept["mlp_channels_kept"]
            return
        linears = prunable_linears(block)
        sharing: dict[int, list[str]] = {}  # linears reading the same input share one statistic object
        for name in linears:
            sharing.setdefault(id(stats[name]) if stats else id(linears[name]), []).append(name)
        for names in sharing.values():
            prune_linears([linears[name] for name in names], settings.method, pattern,
                          stats[names[0]].value if stats else None)
        for name, linear in linears.items():
            sparsity[f"{prefix}.{index}.{name}"] = float((linear.weight == 0).float().mean())

    calibrate_sequentially(model, samples if samples is not None else torch.zeros(0, 1, dtype=torch.long),
                           statistic, prune_block, row_weights, settings.batch_size, hidden_states, hidden_dir,
                           progress)
    if pattern.kind == "structured":
        _shrink_config(model)
    return sparsity


def check_settings(settings: PruneSettings) -> Pattern:
    """The parsed pattern, or ValueError naming the first setting that cannot work (before any calibration)."""
    pattern = parse_pattern(settings.pattern)
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")
    if pattern.kind == "structured" and settings.method not in STRUCTURED_METHODS:
        raise ValueError(f"structured pruning supports {', '.join(STRUCTURED_METHODS)}, not {settings.method!r}")
    if settings.calibration not in CALIBRATIONS:
        raise ValueError(f"calibration is one of {', '.join(CALIBRATIONS)}, not {settings.calibration!r}")
    if settings.sink_weighting not in SINK_WEIGHTINGS:
        raise ValueError(f"sink weighting is one of {', '.join(SINK_WEIGHTINGS)}, not {settings.sink_weighting!r}")
    if settings.sink_weighting == "per-timestep" and settings.calibration != "noised":
        raise ValueError("per-timestep sink weighting weights each noised window by its own timestep's score: "
                         "it needs calibration 'noised'")
    return pattern


def sample_row_weights(sink_scores: torch.Tensor, settings: PruneSettings) -> torch.Tensor:
    """(1 - sink score) for every calibration sample's positions, in the order the
    samples are built: the windows (clean), or timestep-major noised windows."""
    timesteps = len(settings.timesteps)
    if sink_scores.dim() == 2:
        sink_scores = sink_scores.expand(timesteps, *sink_scores.shape)
    if settings.calibration == "clean":
        return 1 - sink_scores.mean(0)
    if settings.sink_weighting == "mean":
        sink_scores = sink_scores.mean(0).expand_as(sink_scores)
    return (1 - sink_scores).flatten(0, 1)


def _shrink_config(model: DiffusionLM) -> None:
    """Describe the sliced model: every block now has the same, smaller, sizes."""
    block = model.blocks[0]
    attention = block.get_submodule(model.attention_path) if model.attention_path else block
    down = block.get_submodule(model.linear_roles["down"])
    model.config = dataclasses.replace(
        model.config, intermediate_size=down.in_features, num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads, explicit_head_dim=model.config.head_dim)
