"""The engine's knobs, in one place so the scheduler and the engine read the same ones."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the step-level scheduler and engine-wide defaults.

    - `max_num_seqs`: sequences running at once (slots), hence rows per forward pass.
    - `max_tokens_per_step`: padded positions one forward pass may compute
      (rows x longest row); also the longest prompt + max_tokens accepted.
    - `max_queue`: requests waiting for a slot; beyond it `submit` refuses at once.
    - `max_padding_ratio`: a pass only batches rows whose lengths differ by at most
      this factor (prefix-cached rows are much shorter than full ones); others wait
      for the next pass, oldest-served first.
    - `prefix_cache`, `dual_cache`: defaults for requests that do not choose
      (Fast-dLLM's PrefixCache and DualCache; the dual cache implies the prefix cache).
    - `stop_token_ids`: default for requests that do not choose: token ids that end
      a completion as EOS does (an instruct model's end-of-turn token, say).
    - `max_model_len`: the longest prompt + max_tokens accepted (default: as many as
      `max_tokens_per_step` and the model's positions allow); it also sizes the KV
      arena, `max_num_seqs + 1` slots of this many positions per layer.
    - `cuda_graphs`: on a GPU, capture each pass shape (rounded up to a bucket) once as a
      CUDA graph and replay it, instead of launching every kernel from Python each step.
    - `capture_block_lengths`: on a GPU with graphs, capture at start the dual-cache block passes
      of these block lengths, for every row count and cache length (`ModelRunner.warm_up`), so
      that no request pays for a capture; other passes (a block's first, full pass) are
      captured on first use. Empty: capture everything on first use.
    - `fuse_projections`: serve q/k/v as one matmul and gate/up as one (`sinkprune.dlm.fusion`):
      the same outputs with fewer, wider GEMMs; applied by `serve.engine.prepare` at load.
    - `compile_elementwise`: run the blocks' norm, rotary and SwiGLU chains through torch.compile,
      one generated kernel each, bit for bit the eager outputs (`sinkprune.dlm.layers`);
      process-wide; off until a GPU measurement shows it pays (compiling costs seconds at start).
    """

    max_num_seqs: int = 8
    max_tokens_per_step: int = 8192
    max_queue: int = 64
    max_padding_ratio: float = 2.0
    prefix_cache: bool = False
    dual_cache: bool = False
    stop_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    cuda_graphs: bool = True
    capture_block_lengths: tuple[int, ...] = (32,)
    fuse_projections: bool = True
    compile_elementwise: bool = False

    def __post_init__(self) -> None:
        for name in ("stop_token_ids", "capture_block_lengths"):  # YAML and JSON give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(length < 1 for length in self.capture_block_lengths):
            raise ValueError(f"EngineConfig.capture_block_lengths must be >= 1, got {self.capture_block_lengths}")
        for name in ("max_num_seqs", "max_tokens_per_step", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"EngineConfig.max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_padding_ratio < 1:
            raise ValueError(f"EngineConfig.max_padding_ratio must be >= 1, got {self.max_padding_ratio}")
