"""How much memory calibration needs, before it starts (docs/CALIBRATION.md).

peak = weights + one block's statistics + hidden states + one batch's activations

- weights: every parameter in the calibration dtype (loaded once, pruned in place);
- statistics of one block (only one block's exist at a time): Wanda keeps a
  float64 vector per distinct linear input (q/k/v share one, gate/up one);
  SparseGPT a float32 Hessian per distinct input, plus its solver's float64
  copies of the largest one (damped Hessian, its Cholesky factor and inverse);
- hidden states: samples x seq x hidden in the calibration dtype, where
  `--hidden-states` puts them (device, host memory, or disk: then one batch);
- one batch through one block: the MLP's three intermediate-width tensors and
  a few hidden-width ones; the sink-mass pass also materialises the float32
  attention probabilities (batch x heads x seq x seq), twice while softmax runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sinkprune.dlm.config import DLMConfig


@dataclass
class CalibrationMemory:
    """Bytes of each term; `hidden_resident` is what of the hidden states sits in
    memory (all of them on the device or host, one batch when they are on disk)."""

    weights: int
    statistics: int
    hidden_states: int
    hidden_resident: int
    batch: int
    place: str

    def in_memory(self) -> int:
        """Bytes in the process's memory (device + host) at the peak."""
        return self.weights + self.statistics + self.hidden_resident + self.batch

    def on_device(self) -> int:
        """Of those, the compute device's: all but hidden states kept on the host."""
        return self.in_memory() - (self.hidden_resident if self.place == "host" else 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "in_memory": self.in_memory(), "on_device": self.on_device()}

    def describe(self) -> str:
        gib = 2**30
        where = {"device": "on the device", "host": "in host memory", "disk": "on disk"}[self.place]
        return (f"calibration memory: weights {self.weights / gib:.2f} GiB + one block's statistics "
                f"{self.statistics / gib:.2f} GiB + one batch {self.batch / gib:.2f} GiB + hidden states "
                f"{self.hidden_states / gib:.2f} GiB {where} = {self.in_memory() / gib:.2f} GiB in memory, "
                f"{self.on_device() / gib:.2f} GiB of it on the device")


def parameter_count(config: DLMConfig) -> int:
    d, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    attention = d * head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    biases = head_dim * (config.num_heads + 2 * config.num_kv_heads) if config.qkv_bias else 0
    block = attention + biases + 3 * d * inter + 2 * d  # two norms
    return config.num_layers * block + 2 * config.vocab_size * d + d  # untied embedding and head, final norm


def distinct_inputs(config: DLMConfig) -> list[int]:
    """Widths of a block's distinct linear inputs: attention (q/k/v), o, MLP (gate/up), down."""
    return [config.hidden_size, config.num_heads * config.head_dim, config.hidden_size, config.intermediate_size]


def calibration_memory(config: DLMConfig, samples: int, seq_len: int, batch_size: int, dtype: torch.dtype,
                       statistic: str | None, place: str = "device", sink_mass: bool = True) -> CalibrationMemory:
    """The estimate for `samples` calibration sequences of `seq_len` tokens (statistic None: magnitude)."""
    size = dtype.itemsize
    inputs = distinct_inputs(config)
    if statistic == "hessian":
        statistics = sum(4 * n * n for n in inputs) + 3 * 8 * max(inputs) ** 2
    elif statistic is not None:
        statistics = sum(8 * n for n in inputs)
    else:
        statistics = 0
    tokens = batch_size * seq_len
    batch = tokens * (3 * config.intermediate_size + 4 * config.hidden_size) * size
    if sink_mass:
        batch = max(batch, 2 * 4 * batch_size * config.num_heads * seq_len * seq_len + tokens * config.hidden_size * size)
    per_token = config.hidden_size * size if statistic is not None else 0  # magnitude keeps no hidden states
    hidden = samples * seq_len * per_token
    resident = min(hidden, tokens * per_token) if place == "disk" else hidden
    return CalibrationMemory(parameter_count(config) * size, statistics, hidden, resident, batch, place)


def prune_memory(config: DLMConfig, settings, windows: int, seq_len: int, dtype: torch.dtype,
                 place: str = "device") -> CalibrationMemory:
    """The estimate for `prune_model(settings)` on `windows` calibration windows."""
    from sinkprune.prune import STATISTIC_OF

    samples = windows * (len(settings.timesteps) if settings.calibration == "noised" else 1)
    statistic = STATISTIC_OF[settings.method.removeprefix("sink-")]
    return calibration_memory(config, samples, seq_len, settings.batch_size, dtype, statistic, place,
                              sink_mass=settings.method.startswith("sink-"))
