"""LLaDA (GSAI-ML/LLaDA-8B-*): a bidirectional LLaMA-style transformer.

Module names follow the public checkpoints (OLMo layout), so their safetensors
load with no renaming: `model.transformer.{wte, blocks.N.*, ln_f, ff_out}`.
"""
from __future__ import annotations

import torch
from torch import nn

from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.layers import AttentionInputs, FusedLinear, KVSlot, RMSNorm, attention, project, swiglu
from sinkprune.dlm.model import DiffusionLM


class LLaDABlock(nn.Module):
    # linears over one input that serving may run as one (`sinkprune.dlm.fusion`)
    fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("ff_proj", "up_proj")}

    def __init__(self, config: DLMConfig):
        super().__init__()
        d, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(q, d, bias=False)
        self.ff_norm = RMSNorm(d, config.norm_eps)
        self.ff_proj = nn.Linear(d, config.intermediate_size, bias=False)  # gate (SiLU side)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)
        self.qkv_proj: FusedLinear | None = None
        self.gate_up_proj: FusedLinear | None = None

    def forward(self, hidden: torch.Tensor, inputs: AttentionInputs, kv: KVSlot | None = None):
        q, k, v = project(self.attn_norm(hidden), self.qkv_proj, self, self.fusions["qkv_proj"])
        attn, mass = attention(q, k, v, self.attn_out, inputs, self.num_heads, self.num_kv_heads, kv)
        hidden = hidden + attn
        gate, up = project(self.ff_norm(hidden), self.gate_up_proj, self, self.fusions["gate_up_proj"])
        hidden = hidden + swiglu(gate, up, self.ff_out)
        return hidden, mass


class LLaDATransformer(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.hidden_size),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.num_layers)),
            "ln_f": RMSNorm(config.hidden_size, config.norm_eps),
            "ff_out": nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        })


class LLaDAModelLM(DiffusionLM):
    # each block's linears by role, for structured pruning (attention sizes live on the block itself)
    linear_roles = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
                    "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
    attention_path = ""

    def __init__(self, config: DLMConfig):
        super().__init__()
        self.config = config
        self.model = LLaDATransformer(config)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.transformer["wte"].weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        return t["ff_out"](t["ln_f"](hidden))
