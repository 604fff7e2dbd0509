"""One batched forward pass over a scheduled batch of sequences, then each sequence's step.

Rows are left-padded with an attention mask (prefix caches left-padded and suffix
caches right-padded, with key masks), which the model guarantees gives every row the
result it would get alone. Runs in the engine's worker thread, never on the event loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sinkprune.dlm.generate import left_pad
from sinkprune.dlm.model import DiffusionLM, KVCache
from serve.requests import StreamEvent
from serve.sequence import Sequence


@dataclass
class StepResult:
    events: list[list[StreamEvent]]  # per sequence of the batch, in order
    query_tokens: int  # positions computed, padding included (rows x longest row)
    cached_tokens: int  # cached positions attended to (prefix and suffix caches), padding included
    cached_rows: int  # rows that ran against a cache
    started: float
    finished: float  # after every sequence's step (events are stamped when the forward pass ended)


class ModelRunner:
    def __init__(self, model: DiffusionLM):
        self.model = model
        config = model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else config.mask_token_id
        self.device = model.embed_weight.device

    @torch.no_grad()
    def step(self, batch: list[Sequence]) -> StepResult:
        started = time.perf_counter()
        plans = [seq.plan() for seq in batch]
        lengths = [len(plan.token_ids) for plan in plans]
        ids, mask = left_pad([plan.token_ids for plan in plans], self.pad_id, self.device)
        cached = [plan.prefix for plan in plans]
        prefix = KVCache.left_pad(cached) if any(c is not None for c in cached) else None
        suffixes = [plan.suffix for plan in plans]
        suffix = KVCache.right_pad(suffixes) if any(c is not None for c in suffixes) else None
        out = self.model(ids, attention_mask=mask if len(set(lengths)) > 1 else None, prefix=prefix, suffix=suffix,
                         return_kv=any(plan.keep is not None for plan in plans))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        computed = time.perf_counter()
        width = ids.shape[1]
        events = []
        for row, (seq, plan) in enumerate(zip(batch, plans)):
            pad = width - lengths[row]
            rows = slice(row, row + 1)
            kept = None if plan.keep is None else out.kv.crop(rows, pad, pad + plan.keep)
            kept_suffix = None if plan.keep_suffix is None else out.kv.crop(rows, pad + plan.keep_suffix, width)
            events.append(seq.advance(plan, out.logits[rows, pad:], kept, kept_suffix, computed))
        attended = sum(0 if c is None else c.mask.numel() for c in (prefix, suffix))
        return StepResult(events, ids.numel(), attended, sum(c is not None for c in cached), started,
                          time.perf_counter())
