"""The reference single-batch sampler: LLaDA's semi-autoregressive block decoding.

Semantics follow LLaDA's `generate.py` (and Dream's rules for Dream's policies):
the answer starts as `gen_length` masks, is decoded block by block, every step is
a full forward pass over the whole sequence, committed tokens are never masked
again. Prompts of different lengths are left-padded and masked out, so a row
decodes exactly as it would alone. With `prefix_cache`, Fast-dLLM's PrefixCache:
only a block's first step is a full pass; later steps of the block recompute the
block and what follows, attending to the keys/values kept from that first pass.
With `dual_cache`, Fast-dLLM's DualCache: later steps recompute only the block,
attending to the kept keys/values before it and after it.
The step itself (`denoise_step`) is shared with the serving engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkprune.dlm.decoding import DREAM_POLICIES, POLICIES, dream_transfer_count, llada_transfer_counts, select
from sinkprune.dlm.model import DiffusionLM


@dataclass
class Generation:
    tokens: torch.Tensor  # (batch, padded prompt + gen_length), left padding kept
    prompt_width: int  # where the generated part starts in every row
    forward_passes: int

    def completions(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_width:]


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padded on the left; returns (ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def validate_schedule(steps: int, gen_length: int, block_length: int) -> int:
    """Check LLaDA's divisibility rules; returns the number of steps per block."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError("steps, gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {num_blocks}")
    return steps // num_blocks


@torch.no_grad()
def model_logits(model: DiffusionLM, x: torch.Tensor, attention_mask, prompt_mask, mask_id: int, cfg_scale: float):
    """Logits for one step, with LLaDA's classifier-free guidance when cfg_scale > 0:
    a second row has the prompt masked, and `un + (cfg + 1) * (cond - un)`."""
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask).logits
    unconditional = x.masked_fill(prompt_mask, mask_id)
    both = torch.cat([x, unconditional])
    mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    logits = model(both, attention_mask=mask2).logits
    cond, uncond = logits.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


@dataclass(frozen=True)
class DenoiseParams:
    """How a request commits tokens at every step (fixed for the whole request)."""

    remasking: str
    temperature: float
    threshold: float | None
    steps_per_block: int
    mask_id: int


def denoise_step(
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: int,
    start: int,
    end: int,
    schedule: torch.Tensor,
    step: int | list[int],
    params: DenoiseParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Step `step` of block [start, end) of `x`: returns `x` with the policy's commits.
    `logits` cover positions `offset` .. `offset + logits.shape[1]` of `x` (a cached pass
    computes only those); `schedule` is the block's LLaDA schedule (see `llada_transfer_counts`).
    `step` may be one per row when the rows are blocks at different steps (the engine's batched step)."""
    span = logits.shape[1]
    view = x[:, offset:offset + span]
    candidates = view == params.mask_id
    candidates[:, :start - offset] = False
    candidates[:, end - offset:] = False
    counts, origin_prob = _step_counts(params.remasking, schedule, candidates, step, params.steps_per_block)
    commit, tokens = select(params.remasking, logits, candidates, counts, params.temperature, params.threshold,
                            generator, origin_prob, params.mask_id)
    view = torch.where(commit, tokens, view)
    return torch.cat([x[:, :offset], view, x[:, offset + span:]], dim=1)


def block_done(x: torch.Tensor, start: int, end: int, step: int, params: DenoiseParams) -> bool:
    """Fixed steps: after `steps_per_block`. Threshold decoding: once no mask is left."""
    if params.threshold is None:
        return step >= params.steps_per_block
    return not (x[:, start:end] == params.mask_id).any()


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor | list[list[int]],
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    cfg_scale: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    mask_id: int | None = None,
    pad_id: int | None = None,
    prefix_cache: bool = False,
    dual_cache: bool = False,
) -> Generation:
    """Decode `gen_length` tokens after each prompt.

    `remasking`: LLaDA's `low_confidence` / `random`, or Dream's `maskgit_plus`,
    `topk_margin`, `entropy`, `origin` (which also use Dream's timestep schedule).
    `threshold`: Fast-dLLM parallel decoding; each block then runs until it has
    no mask left, committing at least one token per step. `prefix_cache`:
    Fast-dLLM's PrefixCache; `dual_cache` (implies it): DualCache. Both are
    approximations; see the module docstring.
    """
    if remasking not in POLICIES:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {', '.join(POLICIES)}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    prefix_cache = prefix_cache or dual_cache
    if prefix_cache and cfg_scale > 0:
        raise ValueError("prefix_cache and dual_cache do not support classifier-free guidance (cfg_scale > 0)")
    steps_per_block = validate_schedule(steps, gen_length, block_length)
    config = model.config
    mask_id = config.mask_token_id if mask_id is None else mask_id
    device = model.embed_weight.device
    if isinstance(prompt_ids, list):
        pad = pad_id if pad_id is not None else (config.pad_token_id if config.pad_token_id is not None else mask_id)
        prompt_ids, attention_mask = left_pad(prompt_ids, pad, device)
    prompt_ids = prompt_ids.to(device)
    batch, width = prompt_ids.shape
    x = torch.cat([prompt_ids, torch.full((batch, gen_length), mask_id, dtype=torch.long, device=device)], dim=1)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask.to(device), torch.ones((batch, gen_length), dtype=torch.long, device=device)], 1)
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :width] = True if attention_mask is None else attention_mask.bool()
    params = DenoiseParams(remasking, temperature, threshold, steps_per_block, mask_id)
    shifted = prefix_cache and model.shift_logits
    passes = 0
    for block in range(gen_length // block_length):
        start, end = width + block * block_length, width + (block + 1) * block_length
        schedule = llada_transfer_counts((x[:, start:end] == mask_id).sum(-1), steps_per_block)
        cut = prefix_cut(start, shifted)
        stop = end if dual_cache else x.shape[1]  # a cached pass computes [cut, stop)
        step, prefix, suffix = 0, None, None
        while not block_done(x, start, end, step, params):
            if prefix is not None:
                span_mask = None if full_mask is None else full_mask[:, cut:stop]
                logits = model(x[:, cut:stop], attention_mask=span_mask, prefix=prefix, suffix=suffix).logits
                offset = cut
            elif prefix_cache:
                out = model(x, attention_mask=full_mask, return_kv=True)
                logits, offset, prefix = out.logits, 0, out.kv.crop(slice(None), 0, cut)
                suffix = out.kv.crop(slice(None), stop, x.shape[1]) if dual_cache else None
            else:
                logits, offset = model_logits(model, x, full_mask, prompt_mask, mask_id, cfg_scale), 0
            passes += 1
            x = denoise_step(x, logits, offset, start, end, schedule, step, params, generator)
            step += 1
    return Generation(x, width, passes)


def prefix_cut(block_start: int, shift_logits: bool) -> int:
    """Where a prefix-cached pass begins: at the block, or one position earlier for a
    shifted model (Dream), whose first block position is predicted by the one before."""
    return max(block_start - int(shift_logits), 0)


def _step_counts(remasking: str, schedule: torch.Tensor, candidates: torch.Tensor, step: int | list[int],
                 steps: int):
    """How many to commit this step: LLaDA's precomputed even schedule, or Dream's
    rule from the masks still left (and, for `origin`, the per-token probability).
    `step` is one for every row, or one per row (the engine batches rows at different steps;
    `origin` draws random numbers and is never batched so)."""
    if remasking not in DREAM_POLICIES:
        if isinstance(step, int):
            return schedule[:, min(step, steps - 1)], None
        columns = torch.tensor([min(row, steps - 1) for row in step], device=schedule.device)
        return schedule.gather(1, columns[:, None]).squeeze(1), None
    remaining = candidates.sum(-1)
    if remasking == "origin":
        last = step >= steps - 1
        times = torch.linspace(1, 1e-3, steps + 1)
        return None, 1.0 if last else 1 - times[step + 1].item() / times[step].item()
    clamped = min(step, steps - 1) if isinstance(step, int) else [min(row, steps - 1) for row in step]
    return dream_transfer_count(remaining, clamped, steps), None