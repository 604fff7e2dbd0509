"""Building blocks shared by the LLaDA and Dream architectures.

The two models differ only in parameter names, biases and grouped-query
attention, so the maths lives here once and each model file only wires its own
(checkpoint-named) modules into these functions.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation computed in float32, as both reference implementations do."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Elementwise:
    """The chains of small elementwise operators in every block: norm, rotary, SwiGLU's activation.

    Eagerly each is several kernels (the norm alone six), which on a GPU cost more in launches
    and round trips to memory than in arithmetic. `compiled_elementwise()` swaps in torch.compile'd
    versions, one generated kernel per chain, with every intermediate rounded to the model's dtype
    as eager code rounds it (inductor's `emulate_precision_casts`): the same outputs in bf16.
    """

    rms_norm: Callable = rms_norm
    rotary_qk: Callable = rotary_qk
    silu_mul: Callable = silu_mul


EAGER = Elementwise()
ops = EAGER  # what the blocks call; process-wide, as a serving process runs one kind of model


def set_elementwise(chosen: Elementwise) -> Elementwise:
    """Make `chosen` the blocks' operators; returns the previous ones."""
    global ops
    previous, ops = ops, chosen
    return previous


def compile_elementwise() -> Elementwise:
    """The operators through torch.compile (dynamic shapes: one compilation per chain, not per shape)."""
    options = {"emulate_precision_casts": True}
    return replace(EAGER, **{f.name: torch.compile(getattr(EAGER, f.name), dynamic=True, fullgraph=True,
                                                   options=options) for f in fields(Elementwise)})


@contextlib.contextmanager
def compiled_elementwise() -> Iterator[None]:
    """Blocks run the compiled operators inside the `with`, the previous ones after."""
    previous = set_elementwise(compile_elementwise())
    try:
        yield
    finally:
        set_elementwise(previous)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its weights, built once per forward.

    `key_mask` is (batch, 1, 1 or queries, keys) bool, True where a key may be
    attended (None: every key is real). `query_mask` is (batch, queries) bool, used only
    to leave padded queries out of the attention mass.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None
    query_mask: torch.Tensor | None
    want_mass: bool = False
    arena: ArenaPass | None = None


@dataclass
class LayerKV:
    """One layer's keys and values, (batch, kv_heads, positions, head_dim), after rotary
    and before grouped-query expansion: what a prefix cache keeps of a layer."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class KVSlot:
    """One layer's link to the caches during one forward pass: attention attends to
    `past` (positions before this pass's own) and `future` (positions after them,
    Fast-dLLM's DualCache) besides its own, and, if `keep`, leaves its own in `current`."""

    past: LayerKV | None = None
    keep: bool = False
    current: LayerKV | None = None
    future: LayerKV | None = None
    arena: LayerKV | None = None  # this layer's part of the engine's KV arena (see `ArenaPass`)


@dataclass
class ArenaPass:
    """One pass through the serving engine's KV arena (`serve.engine.model_runner.KVArena`), the same for
    every layer: per layer (slots, kv_heads, positions, head_dim) keys and values, one slot per sequence.

    Every layer writes its queries' keys and values into the arena in place, at (`write_slots`,
    `write_positions`) (padded queries into a scratch slot): a block pass overwrites its block's cached
    positions, as Fast-dLLM's DualCache does, and nothing is concatenated. With `length`, each row then
    attends positions [0, length) of its slot where `key_mask` (batch, length) allows, in the order of
    the positions (the order of generate()'s prefix + pass + suffix); row i reads slot i (a view, no
    copy) unless `read_slots` (batch,) names the slots. Without `length` (full passes) each row attends
    its own keys. `query_start` (batch,): the position of each row's first query (rotary phases).
    """

    layers: list[LayerKV]
    write_slots: torch.Tensor  # (batch, queries) long
    write_positions: torch.Tensor  # (batch, queries) long
    query_start: torch.Tensor
    length: int = 0
    key_mask: torch.Tensor | None = None
    read_slots: torch.Tensor | None = None

    def exchange(self, arena: LayerKV, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys and values (batch, kv_heads, queries, head_dim) into one layer's arena;
        returns what the rows attend to."""
        arena.keys[self.write_slots, :, self.write_positions] = k.transpose(1, 2)
        arena.values[self.write_slots, :, self.write_positions] = v.transpose(1, 2)
        if not self.length:
            return k, v
        if self.read_slots is None:
            rows = slice(0, k.shape[0])
            return arena.keys[rows, :, :self.length], arena.values[rows, :, :self.length]
        return arena.keys[self.read_slots, :, :self.length], arena.values[self.read_slots, :, :self.length]


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables (batch, 1, seq, head_dim) in the rotate-half layout of LLaMA/OLMo/Qwen2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_attention_inputs(
    attention_mask: torch.Tensor | None,
    batch: int,
    seq: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    dtype: torch.dtype,
    want_mass: bool = False,
    causal: bool = False,
    prefix_mask: torch.Tensor | None = None,
    suffix_mask: torch.Tensor | None = None,
    arena: ArenaPass | None = None,
) -> AttentionInputs:
    """Positions and masks for one forward pass.

    With a padding mask (1 = real token, left or right padding), positions count
    real tokens only, so each row gets exactly the rotary phases it would get
    alone, and padded keys are never attended. `causal` adds an autoregressive
    mask, only to compare a DLM's attention with the AR pattern.

    `prefix_mask` (batch, prefix) bool says which cached prefix positions are real:
    this pass's tokens then continue the prefix (their positions start after its
    real tokens) and attend to its keys as well as their own. `suffix_mask`
    (batch, suffix) likewise for cached positions after this pass's (their keys
    carry their own rotary phases already), which are attended last.
    `arena`: the pass goes through the serving engine's KV arena instead (see `ArenaPass`).
    """
    if arena is not None or prefix_mask is not None or suffix_mask is not None:
        if causal:
            raise ValueError("a prefix or suffix cache cannot be combined with causal attention")
        real = torch.ones((batch, seq), dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.to(device=device, dtype=torch.bool)
        if arena is not None:
            position_ids = arena.query_start[:, None] + real.long().cumsum(-1) - 1
            key_mask = arena.key_mask if arena.length else (None if attention_mask is None else real)
        else:
            empty = real[:, :0]
            prefix_mask = empty if prefix_mask is None else prefix_mask.to(device)
            suffix_mask = empty if suffix_mask is None else suffix_mask.to(device)
            position_ids = prefix_mask.long().sum(-1, keepdim=True) + real.long().cumsum(-1) - 1
            key_mask = torch.cat([prefix_mask, real, suffix_mask], -1)
        cos, sin = rotary_tables(position_ids.clamp(min=0), head_dim, theta, dtype)
        return AttentionInputs(cos, sin, None if key_mask is None else key_mask[:, None, None, :], real, want_mass,
                               arena)
    if attention_mask is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
        key_mask = query_mask = None
    else:
        real = attention_mask.to(device=device, dtype=torch.bool)
        if real.shape != (batch, seq):
            raise ValueError(f"attention_mask shape {tuple(real.shape)} does not match input_ids {(batch, seq)}")
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        key_mask = real[:, None, None, :]
        query_mask = real
    if causal:
        lower = torch.ones((seq, seq), dtype=torch.bool, device=device).tril()[None, None]
        key_mask = lower if key_mask is None else key_mask & lower
    cos, sin = rotary_tables(position_ids, head_dim, theta, dtype)
    return AttentionInputs(cos, sin, key_mask, query_mask, want_mass)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_proj: nn.Module,
    inputs: AttentionInputs,
    num_heads: int,
    num_kv_heads: int,
    kv: KVSlot | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bidirectional multi-head (or grouped-query) attention of projected queries, keys and values
    (batch, seq, heads x head_dim).

    Returns the projected output and, only if `inputs.want_mass`, the attention
    mass per key position: softmax probabilities summed over heads and real
    queries, shape (batch, keys). The default path is fused SDPA; the mass path
    materialises the probabilities and is only for analysis. `kv` exchanges
    keys/values with the prefix and suffix caches or the engine's KV arena (see `KVSlot`).
    """
    batch, seq, width = q.shape
    head_dim = width // num_heads
    q = q.view(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    q, k = ops.rotary_qk(q, k, inputs.cos, inputs.sin)
    if kv is not None and kv.arena is not None:
        k, v = inputs.arena.exchange(kv.arena, k, v)
    elif kv is not None:
        if kv.keep:
            kv.current = LayerKV(k, v)
        if kv.past is not None:
            k = torch.cat([kv.past.keys, k], dim=2)
            v = torch.cat([kv.past.values, v], dim=2)
        if kv.future is not None:
            k = torch.cat([k, kv.future.keys], dim=2)
            v = torch.cat([v, kv.future.values], dim=2)
    mass = None
    if inputs.want_mass:
        groups = num_heads // num_kv_heads
        out, mass = _attention_with_mass(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                         inputs)
    else:
        out = grouped_sdpa(q, k, v, inputs.key_mask)
    out = out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)
    return out_proj(out), mass


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Fused SDPA where several query heads share a key/value head (GQA), without copying the keys and values
    once per query head: the query heads of a group are stacked along the query axis, so each cached key and
    value is read once (Dream-7B: 7 query heads per kv head, a 7x copy of the whole cache per layer and step
    otherwise). Each query row attends exactly as before. torch's `enable_gqa` would do the same but falls back
    to the math kernel on CUDA when a mask is given."""
    batch, heads, queries, head_dim = q.shape
    groups = heads // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    q = q.reshape(batch, k.shape[1], groups * queries, head_dim)  # row g * queries + i: head kv * groups + g
    if key_mask is not None and key_mask.shape[2] > 1:  # a mask per query (the causal comparison): per group too
        key_mask = key_mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # CUDA kernels return (B, L, H, D) strides
    return out.reshape(batch, heads, queries, head_dim)


def _attention_with_mass(q, k, v, inputs: AttentionInputs):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if inputs.key_mask is not None:
        scores = scores.masked_fill(~inputs.key_mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if inputs.query_mask is not None:
        probs_for_mass = probs * inputs.query_mask[:, None, :, None]
    else:
        probs_for_mass = probs
    mass = probs_for_mass.sum(dim=(1, 2))
    return probs.to(v.dtype) @ v, mass


class FusedLinear(nn.Module):
    """Linears that read one input (q, k, v; gate, up) run as one matmul with their output rows stacked,
    split after: fewer and bigger GEMMs when serving (`sinkprune.dlm.fusion`). Stacking output rows
    keeps a 2:4 weight 2:4, since its groups run along the input dimension."""

    def __init__(self, linear: nn.Module, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.linear, self.sizes = linear, tuple(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def project(x: torch.Tensor, fused: FusedLinear | None, owner: nn.Module, names: tuple[str, ...]
            ) -> tuple[torch.Tensor, ...]:
    """The outputs of `owner`'s linears `names` on x: through their fused form when there is one."""
    return fused(x) if fused is not None else tuple(getattr(owner, name)(x) for name in names)


def swiglu(gate: torch.Tensor, up: torch.Tensor, down_proj: nn.Module) -> torch.Tensor:
    return down_proj(ops.silu_mul(gate, up))
