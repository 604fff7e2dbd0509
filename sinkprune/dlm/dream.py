"""Dream (Dream-org/Dream-v0-*-7B): a Qwen2-shaped transformer run bidirectionally.

Qwen2 names (`model.embed_tokens`, `model.layers.N.self_attn.*`, `mlp.*`,
`model.norm`, `lm_head`), q/k/v biases and grouped-query attention. Dream was
initialised from an autoregressive LM, so the logit at position i-1 predicts
token i; `shift_logits` moves them so that callers never need to know.
"""
from __future__ import annotations

import torch
from torch import nn

from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.layers import AttentionInputs, FusedLinear, KVSlot, RMSNorm, attention, project, swiglu
from sinkprune.dlm.model import DiffusionLM


class DreamAttention(nn.Module):
    fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see `sinkprune.dlm.fusion`

    def __init__(self, config: DLMConfig):
        super().__init__()
        d, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.q_proj = nn.Linear(d, q, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(q, d, bias=False)
        self.qkv_proj: FusedLinear | None = None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv: KVSlot | None = None):
        q, k, v = project(x, self.qkv_proj, self, self.fusions["qkv_proj"])
        return attention(q, k, v, self.o_proj, inputs, self.num_heads, self.num_kv_heads, kv)


class DreamMLP(nn.Module):
    fusions = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: DLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: FusedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_up_proj, self, self.fusions["gate_up_proj"])
        return swiglu(gate, up, self.down_proj)


class DreamBlock(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = DreamMLP(config)

    def forward(self, hidden: torch.Tensor, inputs: AttentionInputs, kv: KVSlot | None = None):
        attn, mass = self.self_attn(self.input_layernorm(hidden), inputs, kv)
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, mass


class DreamBackbone(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class DreamModel(DiffusionLM):
    shift_logits = True
    # each block's linears by role, for structured pruning (attention sizes live on `self_attn`)
    linear_roles = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    attention_path = "self_attn"

    def __init__(self, config: DLMConfig):
        super().__init__()
        self.config = config
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))
