"""Monte-Carlo likelihood of text under a masked diffusion LM (LLaDA's estimator).

For each sequence and sample, a mask count k is drawn (stratified over the
samples, as LLaDA's `get_log_likelihood` does), k random positions are masked,
and the cross-entropy on them divided by the mask ratio k/L estimates the
sequence's negative log-likelihood (an upper bound, in nats). The masks come
from a generator seeded by (seed, sequence, sample) on the CPU, independent of
the model and device, so two models scored with the same seed see exactly the
same masks: their difference is a paired estimate, far less noisy than either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sinkprune.dlm.model import DiffusionLM


@dataclass
class LikelihoodResult:
    nll_per_token: torch.Tensor  # one estimate per sequence, nats per scored token
    samples: int
    seed: int

    @property
    def mean(self) -> float:
        return self.nll_per_token.mean().item()

    @property
    def stderr(self) -> float:
        n = self.nll_per_token.numel()
        return self.nll_per_token.std().item() / math.sqrt(n) if n > 1 else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)

    def to_dict(self) -> dict:
        return {"nll": self.mean, "nll_stderr": self.stderr, "perplexity": self.perplexity,
                "sequences": self.nll_per_token.numel(), "samples": self.samples, "seed": self.seed}


@dataclass
class PairedDifference:
    mean: float  # mean of (b - a), nats per token
    stderr: float
    sequences: int

    def to_dict(self) -> dict:
        return {"delta_nll": self.mean, "delta_nll_stderr": self.stderr, "sequences": self.sequences}


def paired_difference(a: LikelihoodResult, b: LikelihoodResult) -> PairedDifference:
    """How much worse `b` is than `a`, from the same sequences and masks."""
    if a.seed != b.seed or a.samples != b.samples or a.nll_per_token.shape != b.nll_per_token.shape:
        raise ValueError("paired comparison needs both results from the same sequences, samples and seed")
    diff = b.nll_per_token - a.nll_per_token
    n = diff.numel()
    return PairedDifference(diff.mean().item(), diff.std().item() / math.sqrt(n) if n > 1 else float("nan"), n)


def sample_masks(length: int, samples: int, generator: torch.Generator, scored_from: int = 0) -> torch.Tensor:
    """(samples, length) bool masks over positions >= `scored_from`, with mask
    counts spread evenly over 1..L from a random offset (stratified)."""
    target = length - scored_from
    offset = torch.randint(1, target + 1, (), generator=generator).item()
    counts = torch.round(torch.linspace(offset, offset + (samples - 1) * target / samples, samples)).long()
    counts = (counts - 1) % target + 1
    masks = torch.zeros((samples, length), dtype=torch.bool)
    for row, count in enumerate(counts.tolist()):
        positions = torch.randperm(target, generator=generator)[:count] + scored_from
        masks[row, positions] = True
    return masks


@torch.no_grad()
def estimate_nll(
    model: DiffusionLM,
    sequences: torch.Tensor,
    samples: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    scored_from: int = 1,
    progress: bool = False,
) -> LikelihoodResult:
    """NLL per token of each row of `sequences` (batch, L), equal lengths.

    `scored_from=1` leaves the leading BOS unscored and never masked, as it is
    at generation time. `samples` Monte-Carlo samples per sequence (LLaDA's
    paper uses 128).
    """
    mask_id = model.config.mask_token_id
    device = model.embed_weight.device
    num_seq, length = sequences.shape
    scored = length - scored_from
    totals = torch.zeros(num_seq, dtype=torch.float64)
    for i in tqdm(range(num_seq), desc="likelihood", disable=not progress, unit="seq"):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63)  # any seed, even 53-bit ones
        masks = sample_masks(length, samples, generator, scored_from)
        ratios = masks.sum(-1).double() / scored
        target = sequences[i].to(device)
        for lo in range(0, samples, batch_size):
            m = masks[lo:lo + batch_size].to(device)
            noisy = torch.where(m, torch.full_like(m, mask_id, dtype=torch.long), target.expand_as(m))
            logits = model(noisy).logits
            ce = F.cross_entropy(logits[m].float(), target.expand_as(m)[m], reduction="none").double().cpu()
            per_sample = torch.zeros(m.shape[0], dtype=torch.float64).index_add_(0, m.nonzero()[:, 0].cpu(), ce)
            totals[i] += (per_sample / ratios[lo:lo + batch_size]).sum()
    return LikelihoodResult((totals / samples / scored).float(), samples, seed)
