"""What every diffusion LM here shares: one forward pass, its output, and the hooks
(embed, blocks, head) that layer-by-layer calibration walks through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.layers import AttentionInputs, make_attention_inputs


@dataclass
class DLMOutput:
    """`logits[b, i]` always predicts position i (Dream's shift is already applied).
    `attention_mass` is one (batch, seq) tensor per layer when asked for, else None."""

    logits: torch.Tensor
    attention_mass: list[torch.Tensor] | None = None


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
    ) -> AttentionInputs:
        batch, seq = input_ids.shape
        param = self.embed_weight
        return make_attention_inputs(
            attention_mask, batch, seq, self.config.head_dim, self.config.rope_theta,
            param.device, param.dtype, want_mass, causal,
        )

    @property
    def embed_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def logits_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(hidden)
        if not self.shift_logits:
            return logits
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if attention_mask is None:
            return shifted
        # a left-padded row's first real token keeps its own logit, as it would alone
        first = attention_mask.bool() & (attention_mask.long().cumsum(-1) == 1)
        return torch.where(first[..., None], logits, shifted)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attention_mass: bool = False,
        causal: bool = False,
    ) -> DLMOutput:
        """Full bidirectional pass. `attention_mask` (batch, seq), 1 for real tokens,
        makes a padded row give the same logits as that row alone. `causal=True`
        is for analysis only (the AR-style comparison of attention sinks)."""
        inputs = self.attention_inputs(input_ids, attention_mask, output_attention_mass, causal)
        hidden = self.embed(input_ids)
        masses = []
        for block in self.blocks:
            hidden, mass = block(hidden, inputs)
            masses.append(mass)
        return DLMOutput(self.logits_from_hidden(hidden, attention_mask), masses if output_attention_mass else None)
