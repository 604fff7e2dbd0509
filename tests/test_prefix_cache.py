"""The model's cache paths (Fast-dLLM's PrefixCache and DualCache): a pass over a segment that
attends to cached keys/values before (and after) it must reproduce the full pass wherever nothing changed."""
from __future__ import annotations

import pytest
import torch

from sinkprune.dlm.generate import generate, left_pad, prefix_cut
from sinkprune.dlm.model import KVCache
from tests.conftest import MASK_ID, PAD_ID, random_model


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 90, (n,), generator=generator).tolist() for n in lengths]
    return left_pad(rows, PAD_ID)


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_segment_pass_against_the_cache_equals_the_full_pass(model_type, cut):
    model = random_model(model_type)
    ids, mask = padded_batch([12, 7, 10])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_kv=True)
        prefix = full.kv.crop(slice(None), 0, cut)
        segment = model(ids[:, cut:], attention_mask=mask[:, cut:], prefix=prefix)
    # a shifted model's first segment position has no predecessor in the pass: callers drop it
    first = 1 if model.shift_logits else 0
    real = mask[:, cut + first:].bool()
    torch.testing.assert_close(segment.logits[:, first:][real], full.logits[:, cut + first:][real],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cut, end", [(1, 5), (5, 9), (6, 12)])
def test_segment_between_prefix_and_suffix_caches_equals_the_full_pass(model_type, cut, end):
    model = random_model(model_type)
    ids, mask = padded_batch([12, 7, 10])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_kv=True)
        prefix, suffix = full.kv.crop(slice(None), 0, cut), full.kv.crop(slice(None), end, ids.shape[1])
        segment = model(ids[:, cut:end], attention_mask=mask[:, cut:end], prefix=prefix, suffix=suffix)
    assert segment.logits.shape[1] == end - cut
    first = 1 if model.shift_logits else 0
    real = mask[:, cut + first:end].bool()
    torch.testing.assert_close(segment.logits[:, first:][real], full.logits[:, cut + first:end][real],
                               rtol=1e-10, atol=1e-10)


def test_right_padded_suffixes_give_each_row_its_own_result(model_type):
    """Rows with suffix caches of different lengths (one of them empty, one absent) batched together."""
    model = random_model(model_type)
    rows = [torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 8, 6)]
    spans = [(4, 7), (2, 8), (0, 6)]  # (cut, end): row 1's suffix is empty, row 2 has no caches at all
    alone, prefixes, suffixes, segments = [], [], [], []
    with torch.no_grad():
        for row, (cut, end) in zip(rows, spans):
            out = model(row[None], return_kv=True)
            alone.append(out.logits[0, cut:end])
            prefixes.append(out.kv.crop(slice(None), 0, cut) if cut else None)
            suffixes.append(out.kv.crop(slice(None), end, len(row)) if cut else None)
            segments.append(row[cut:end].tolist())
        ids, mask = left_pad(segments, PAD_ID)
        batched = model(ids, attention_mask=mask, prefix=KVCache.left_pad(prefixes),
                        suffix=KVCache.right_pad(suffixes)).logits
    for r, (expected, (cut, _)) in enumerate(zip(alone, spans)):
        got = batched[r, ids.shape[1] - len(segments[r]):]
        first = 1 if model.shift_logits and cut else 0
        torch.testing.assert_close(got[first:], expected[first:], rtol=1e-10, atol=1e-10)


def test_cached_keys_equal_the_full_pass_keys(model_type):
    model = random_model(model_type)
    ids, mask = padded_batch([9, 6])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_kv=True)
        prefix = full.kv.crop(slice(None), 0, 4)
        segment = model(ids[:, 4:], attention_mask=mask[:, 4:], prefix=prefix, return_kv=True)
    assert len(full.kv.layers) == model.config.num_layers
    for whole, part in zip(full.kv.layers, segment.kv.layers):
        assert whole.keys.shape[1] == model.config.num_kv_heads
        real = mask[:, 4:].bool()
        torch.testing.assert_close(part.keys.transpose(1, 2)[real], whole.keys[:, :, 4:].transpose(1, 2)[real],
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(part.values.transpose(1, 2)[real], whole.values[:, :, 4:].transpose(1, 2)[real],
                                   rtol=1e-10, atol=1e-10)


def test_left_padded_caches_give_each_row_its_own_result(model_type):
    """Rows with caches of different lengths (and one with none) batched together."""
    model = random_model(model_type)
    rows = [torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 8, 6)]
    cuts = [6, 3, 0]
    alone, caches, segments = [], [], []
    with torch.no_grad():
        for row, cut in zip(rows, cuts):
            out = model(row[None], return_kv=True)
            alone.append(out.logits[0, cut:])
            caches.append(out.kv.crop(slice(None), 0, cut) if cut else None)
            segments.append(row[cut:].tolist())
        ids, mask = left_pad(segments, PAD_ID)
        batched = model(ids, attention_mask=mask, prefix=KVCache.left_pad(caches)).logits
    for r, (expected, cut) in enumerate(zip(alone, cuts)):
        got = batched[r, ids.shape[1] - len(segments[r]):]
        first = 1 if model.shift_logits and cut else 0
        torch.testing.assert_close(got[first:], expected[first:], rtol=1e-10, atol=1e-10)


def test_default_pass_returns_no_cache():
    model = random_model("llada")
    with torch.no_grad():
        assert model(torch.tensor([[3, 4, MASK_ID]])).kv is None


def test_prefix_cut_starts_one_early_for_shifted_models():
    assert prefix_cut(10, False) == 10
    assert prefix_cut(10, True) == 9
    assert prefix_cut(0, True) == 0


def test_one_step_per_block_never_uses_the_cache(model_type):
    """With one step per block every pass is a block's first (full) pass: identical output."""
    model = random_model(model_type)
    kwargs = dict(steps=4, gen_length=8, block_length=2)
    plain = generate(model, [[3, 4, 5]], **kwargs)
    cached = generate(model, [[3, 4, 5]], prefix_cache=True, **kwargs)
    assert torch.equal(plain.tokens, cached.tokens)


class PassLengths(torch.nn.Module):
    """Wraps a model and records the length of every pass."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.lengths = model, []
        self.config, self.shift_logits = model.config, model.shift_logits

    @property
    def embed_weight(self):
        return self.inner.embed_weight

    def forward(self, ids, **kwargs):
        self.lengths.append(ids.shape[1])
        return self.inner(ids, **kwargs)


def test_cached_generation_runs_full_passes_only_at_block_starts(model_type):
    model = PassLengths(random_model(model_type))
    out = generate(model, [[3, 4, 5]], steps=8, gen_length=8, block_length=4, prefix_cache=True)
    shift = int(model.shift_logits)
    assert model.lengths == [11, 11 - 3 + shift, 11 - 3 + shift, 11 - 3 + shift, 11, 4 + shift, 4 + shift, 4 + shift]
    assert out.forward_passes == 8
    assert not (out.completions() == MASK_ID).any()


def test_cached_generation_first_step_equals_uncached(model_type):
    model = random_model(model_type)
    kwargs = dict(gen_length=8, block_length=8)
    # one step total: only the (full) first pass runs
    plain = generate(model, [[3, 4, 5]], steps=1, **kwargs)
    cached = generate(model, [[3, 4, 5]], steps=1, prefix_cache=True, **kwargs)
    assert torch.equal(plain.tokens, cached.tokens)


def test_dual_cache_recomputes_only_the_block_after_its_first_pass(model_type):
    model = PassLengths(random_model(model_type))
    out = generate(model, [[3, 4, 5]], steps=8, gen_length=8, block_length=4, dual_cache=True)
    shift = int(model.shift_logits)
    assert model.lengths == [11, 4 + shift, 4 + shift, 4 + shift] * 2
    assert out.forward_passes == 8
    assert not (out.completions() == MASK_ID).any()


def test_dual_cache_with_a_single_block_equals_the_prefix_cache(model_type):
    """Nothing follows the only block, so the suffix cache is empty and the passes are the same."""
    model = random_model(model_type)
    kwargs = dict(steps=8, gen_length=8, block_length=8)
    prefix = generate(model, [[3, 4, 5]], prefix_cache=True, **kwargs)
    dual = generate(model, [[3, 4, 5]], dual_cache=True, **kwargs)
    assert torch.equal(prefix.tokens, dual.tokens)


@pytest.mark.parametrize("cache", ["prefix_cache", "dual_cache"])
def test_batched_cached_generation_equals_one_by_one(model_type, cache):
    model = random_model(model_type)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    kwargs = dict(steps=8, gen_length=8, block_length=4, **{cache: True})
    batched = generate(model, prompts, pad_id=PAD_ID, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], **kwargs)
        assert torch.equal(batched.completions()[row], alone.completions()[0]), f"row {row} differs"


@pytest.mark.parametrize("cache", ["prefix_cache", "dual_cache"])
def test_caches_refuse_guidance(cache):
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(random_model("llada"), [[3]], steps=4, gen_length=4, block_length=4, cfg_scale=1.0,
                 **{cache: True})


@pytest.mark.parametrize("cache", ["prefix_cache", "dual_cache"])
def test_cached_output_stays_close_to_uncached(model_type, cache):
    """An approximation, not an identity: on a smooth random model most tokens agree
    (uniformly random tokens would agree 1% of the time). The quality cost on a trained
    model is what `python -m benchmarks.bench_engine` measures (docs/ENGINE.md)."""
    model = random_model(model_type, std=0.1)
    agree = total = 0
    for i in range(6):
        prompt = [3 + i, 10 + i, 20 + 2 * i, 40, 41 + i][:2 + i % 4]
        kwargs = dict(steps=16, gen_length=16, block_length=4)
        plain = generate(model, [prompt], **kwargs).completions()[0]
        cached = generate(model, [prompt], **{cache: True}, **kwargs).completions()[0]
        agree += (plain == cached).sum().item()
        total += plain.numel()
    assert agree / total > 0.5
