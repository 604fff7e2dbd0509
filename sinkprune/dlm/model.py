"""What every diffusion LM here shares: one forward pass, its output, and the hooks
(embed, blocks, head) that layer-by-layer calibration walks through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.layers import ArenaPass, AttentionInputs, KVSlot, LayerKV, make_attention_inputs


@dataclass
class KVCache:
    """Every layer's keys/values of a run of positions, and which of them are real
    (False: padding). A cached pass attends to these instead of recomputing the
    positions they came from: before it (Fast-dLLM's PrefixCache) or also after it
    (DualCache)."""

    layers: list[LayerKV]
    mask: torch.Tensor  # (batch, positions) bool

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def crop(self, rows: slice, start: int, end: int) -> KVCache:
        """Positions [start, end) of some rows, copied so that the batch can be freed."""
        return KVCache([LayerKV(kv.keys[rows, :, start:end].clone(), kv.values[rows, :, start:end].clone())
                        for kv in self.layers], self.mask[rows, start:end].clone())

    @staticmethod
    def left_pad(caches: list[KVCache | None]) -> KVCache:
        """Stack one-row caches into a batch, left-padded to the longest (None: empty).
        For prefixes: their real positions must end where the pass begins."""
        return KVCache._stack(caches, left=True)

    @staticmethod
    def right_pad(caches: list[KVCache | None]) -> KVCache:
        """Stack one-row caches into a batch, right-padded to the longest (None: empty).
        For suffixes: their real positions must start where the pass ends."""
        return KVCache._stack(caches, left=False)

    @staticmethod
    def _stack(caches: list[KVCache | None], left: bool) -> KVCache:
        if len(caches) == 1 and caches[0] is not None:
            return caches[0]
        width = max(c.length for c in caches if c is not None)
        num_layers = len(next(c for c in caches if c is not None).layers)

        def stack(part, dim: int) -> torch.Tensor:
            return _pad_rows([None if c is None else part(c) for c in caches], width, dim, left)

        layers = [LayerKV(stack(lambda c: c.layers[i].keys, 2), stack(lambda c: c.layers[i].values, 2))
                  for i in range(num_layers)]
        return KVCache(layers, stack(lambda c: c.mask, 1))


def _pad_rows(rows: list[torch.Tensor | None], width: int, dim: int, left: bool) -> torch.Tensor:
    """Concatenate one-row tensors along the batch, zero-padded (False for masks) on
    the left or right of their position dimension `dim` to `width` (None: all padding)."""
    like = next(r for r in rows if r is not None)
    padded = []
    for row in rows:
        row = like.narrow(dim, 0, 0) if row is None else row
        shape = list(row.shape)
        shape[dim] = width - shape[dim]
        pad = row.new_zeros(shape)
        padded.append(torch.cat([pad, row] if left else [row, pad], dim=dim))
    return torch.cat(padded)


@dataclass
class DLMOutput:
    """`logits[b, i]` always predicts position i (Dream's shift is already applied).
    `attention_mass` is one (batch, seq) tensor per layer when asked for, else None.
    `kv` holds the keys/values of this pass's positions when asked for, else None."""

    logits: torch.Tensor
    attention_mass: list[torch.Tensor] | None = None
    kv: KVCache | None = None


class DiffusionLM(nn.Module):
    """Base of the LLaDA and Dream models; subclasses only name their modules."""

    config: DLMConfig
    shift_logits = False

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        want_mass: bool = False,
        causal: bool = False,
        prefix_mask: torch.Tensor | None = None,
        suffix_mask: torch.Tensor | None = None,
        arena: ArenaPass | None = None,
    ) -> AttentionInputs:
        batch, seq = input_ids.shape
        param = self.embed_weight
        return make_attention_inputs(
            attention_mask, batch, seq, self.config.head_dim, self.config.rope_theta,
            param.device, param.dtype, want_mass, causal, prefix_mask, suffix_mask, arena,
        )

    @property
    def embed_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def logits_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every position, or only of `positions` (batch, n) long: the head then runs on
        n positions per row instead of all of them (a sampler reads only its block's logits)."""
        if positions is None:
            if not self.shift_logits:
                return self.head(hidden)
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        source = positions
        if self.shift_logits:
            # position i is predicted from i - 1, except a row's first real position (position 0 with
            # no mask), which keeps its own logit as it would alone: a left-padded row's first token
            first = positions == 0 if attention_mask is None else \
                (attention_mask.bool() & (attention_mask.long().cumsum(-1) == 1)).gather(1, positions)
            source = torch.where(first, positions, (positions - 1).clamp(min=0))
        picked = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(picked)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attention_mass: bool = False,
        causal: bool = False,
        prefix: KVCache | None = None,
        return_kv: bool = False,
        suffix: KVCache | None = None,
        arena: ArenaPass | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> DLMOutput:
        """Full bidirectional pass. `attention_mask` (batch, seq), 1 for real tokens,
        makes a padded row give the same logits as that row alone. `causal=True`
        is for analysis only (the AR-style comparison of attention sinks).

        `prefix`: `input_ids` continue these cached positions, which are attended to
        but not recomputed; the logits cover `input_ids` only. For a shifted model
        (Dream) the first real position of the pass has no predecessor in it and
        keeps its own logit, so callers start the pass one position early.
        `suffix`: cached positions that follow `input_ids` (Fast-dLLM's DualCache),
        attended to but not recomputed. `return_kv` returns this pass's keys/values
        (to build such caches). `arena`: keys and values go through the serving engine's
        KV arena instead, written in place (see `ArenaPass`).
        `logits_at` (batch, n) long: return the logits of these positions of the pass only.
        """
        inputs = self.attention_inputs(input_ids, attention_mask, output_attention_mass, causal,
                                       None if prefix is None else prefix.mask,
                                       None if suffix is None else suffix.mask, arena)
        slots = [KVSlot(arena=layer) for layer in arena.layers] if arena is not None else \
            self._kv_slots(prefix, suffix, return_kv)
        hidden = self.embed(input_ids)
        masses = []
        for block, slot in zip(self.blocks, slots):
            hidden, mass = block(hidden, inputs, slot)
            masses.append(mass)
        kv = None
        if return_kv:
            real = inputs.query_mask if inputs.query_mask is not None else \
                torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            kv = KVCache([slot.current for slot in slots], real)
        return DLMOutput(self.logits_from_hidden(hidden, attention_mask, logits_at), masses if output_attention_mass else None, kv)

    def _kv_slots(self, prefix: KVCache | None, suffix: KVCache | None, keep: bool) -> list[KVSlot | None]:
        if prefix is None and suffix is None and not keep:
            return [None] * len(self.blocks)
        none = [None] * len(self.blocks)
        past = prefix.layers if prefix is not None else none
        future = suffix.layers if suffix is not None else none
        return [KVSlot(before, keep, future=after) for before, after in zip(past, future)]
