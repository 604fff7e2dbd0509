"""Decoding policies: which masked positions to commit at a denoising step, and to what.

Every policy is a pure function of the step's logits, the candidate positions
(masked and inside the current block) and how many to commit; it returns a
boolean commit map and the proposed tokens. The reference `generate()` and the
serving engine both call these, so a request decodes the same way in both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
LLADA_POLICIES = ("low_confidence", "random")
DREAM_POLICIES = ("maskgit_plus", "topk_margin", "entropy", "origin")
POLICIES = LLADA_POLICIES + DREAM_POLICIES


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Argmax at temperature 0; otherwise Gumbel-max in float64 as LLaDA does
    (`exp(logits) / (-log u) ** T`), since lower precision biases the sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, generator=generator, dtype=torch.float64, device=_rng_device(generator, logits))
    gumbel = (-torch.log(u.to(logits.device))) ** temperature
    return (logits64.exp() / gumbel).argmax(dim=-1)


def draws_per_position(policy: str, temperature: float) -> bool:
    """Whether a step draws random numbers for every position of its logits (Gumbel noise, `random`
    confidences, `origin` coin flips): it then needs the logits of the same span as the reference loop,
    to consume the same random stream; otherwise only the block's logits matter."""
    return temperature > 0 or policy in ("random", "origin")


def _rng_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def llada_transfer_counts(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: spread `num_masked` (per row) evenly over `steps`; the
    first `n % steps` steps take one more. Shape (batch, steps)."""
    base = num_masked // steps
    extra = num_masked % steps
    counts = base[:, None].expand(-1, steps).clone()
    counts += (torch.arange(steps, device=num_masked.device)[None] < extra[:, None]).long()
    return counts


def dream_transfer_count(num_masked: torch.Tensor, step: int | list[int], steps: int, eps: float = 1e-3
                         ) -> torch.Tensor:
    """Dream's schedule: with t, s consecutive points of linspace(1, eps, steps + 1),
    unmask int(masked * (1 - s / t)) now, and everything left on the last step.
    `step` is one for every row, or one per row (rows of a batch at different steps)."""
    rows = [step] * num_masked.shape[0] if isinstance(step, int) else step
    times = torch.linspace(1, eps, steps + 1).tolist()
    last = [row == steps - 1 for row in rows]
    if all(last):
        return num_masked.clone()
    share = torch.tensor([0.0 if end else 1 - times[row + 1] / times[row] for row, end in zip(rows, last)],
                         dtype=torch.float64, device=num_masked.device)
    counts = (num_masked.double() * share).long()
    return counts if not any(last) else torch.where(torch.tensor(last, device=num_masked.device), num_masked, counts)


def _confidence(policy: str, logits: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if policy == "random":
        return torch.rand(tokens.shape, generator=generator, device=_rng_device(generator, tokens)).to(tokens.device)
    probs = F.softmax(logits.float(), dim=-1)
    if policy in ("low_confidence", "maskgit_plus"):
        return probs.gather(-1, tokens[..., None]).squeeze(-1)
    if policy == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if policy == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    raise ValueError(f"unknown remasking policy {policy!r}; choose one of {', '.join(POLICIES)}")


def commit_top_k(confidence: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Commit, per row, the `counts[row]` candidates with the highest confidence."""
    conf = confidence.masked_fill(~candidates, NEG_INF)
    order = conf.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    counts = torch.minimum(counts, candidates.sum(-1))
    return (rank < counts[:, None]) & candidates


def commit_above_threshold(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM parallel decoding: every candidate with confidence >= threshold,
    and always the single most confident one, so each step makes progress."""
    conf = confidence.masked_fill(~candidates, NEG_INF)
    best = F.one_hot(conf.argmax(dim=-1), conf.shape[-1]).bool() & candidates
    return ((conf >= threshold) & candidates) | best


def select(
    policy: str,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    counts: torch.Tensor | None,
    temperature: float = 0.0,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    origin_prob: float | None = None,
    mask_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of any policy: returns `(commit, tokens)`, both (batch, seq).

    `counts` is the per-row number to commit (ignored with `threshold`, where the
    number is data-dependent). `origin` (Dream) commits each candidate
    independently with probability `origin_prob` instead. `mask_id`, if given,
    can never be proposed: a committed [MASK] would look undecoded forever.
    """
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = NEG_INF
    tokens = sample_tokens(logits, temperature, generator)
    if policy == "origin":
        draws = torch.rand(candidates.shape, generator=generator, device=_rng_device(generator, candidates))
        return (draws.to(candidates.device) < origin_prob) & candidates, tokens
    confidence = _confidence(policy, logits, tokens, generator)
    if threshold is not None:
        return commit_above_threshold(confidence, candidates, threshold), tokens
    return commit_top_k(confidence, candidates, counts), tokens

