"""Patterns, masks, scores, SparseGPT and sequential pruning with every method."""
from __future__ import annotations

import weakref

import pytest
import torch

from sinkprune import calibration
from sinkprune.calibration import default_timesteps, prunable_linears
from sinkprune.masks import follows_pattern, make_mask, parse_pattern
from sinkprune.prune import METHODS, PruneSettings, prune_model
from sinkprune.scores import wanda_score
from sinkprune.sink_scores import sink_scores_from_mass
from sinkprune.sparsegpt import sparsegpt_prune
from tests.conftest import random_model


def test_parse_pattern():
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern("unstructured:0.3").sparsity == 0.3
    for bad in ("4:2", "unstructured:1.5", "half"):
        with pytest.raises(ValueError, match="pattern|unstructured"):
            parse_pattern(bad)


def test_nm_mask_keeps_the_top_n_of_every_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    mask = make_mask(scores, parse_pattern("2:4"))
    assert mask.tolist() == [[False, True, True, False, True, False, True, False]]
    assert follows_pattern(torch.randn(8, 16) * make_mask(torch.rand(8, 16), parse_pattern("2:4")), parse_pattern("2:4"))
    assert not follows_pattern(torch.ones(2, 8), parse_pattern("2:4"))


def test_unstructured_mask_prunes_each_row_by_ratio():
    scores = torch.rand(6, 40)
    mask = make_mask(scores, parse_pattern("unstructured:0.25"))
    assert (mask.sum(1) == 30).all()
    for row in range(6):  # the dropped ones are each row's lowest
        assert scores[row][~mask[row]].max() <= scores[row][mask[row]].min()


def test_wanda_prefers_weights_on_loud_inputs():
    keep = make_mask(wanda_score(torch.ones(1, 4), torch.tensor([1.0, 100.0, 4.0, 9.0])), parse_pattern("2:4"))
    assert keep.tolist() == [[False, True, False, True]]


def test_sink_score_is_nearly_a_hard_threshold_in_reference_units():
    mass = torch.ones(1, 32) * 10.0
    mass[0, 0] = 200.0  # a sink far above mean + 2 std
    scores = sink_scores_from_mass(mass)
    assert scores[0, 0] > 0.99 and (scores[0, 1:] < 0.01).all()


@pytest.mark.parametrize("spec", ["2:4", "unstructured:0.5", "unstructured:0.3"])
def test_sparsegpt_hits_the_pattern_and_beats_magnitude_on_reconstruction(spec):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator) / 8 + torch.eye(64)  # correlated inputs ...
    scale = torch.rand(64, generator=generator) * 3 + 0.1  # ... on channels of uneven size
    x = torch.randn(512, 64, generator=generator) @ mixing * scale
    weight = torch.randn(16, 64, generator=generator)
    pattern = parse_pattern(spec)
    pruned = sparsegpt_prune(weight, x.T @ x, pattern, block_size=32)
    if pattern.kind == "nm":
        assert follows_pattern(pruned, pattern)
        assert ((pruned.reshape(16, 16, 4) != 0).sum(-1) == 2).all()
    else:
        zeros = (pruned == 0).sum(1).float()
        assert (zeros - pattern.ratio * 64).abs().max() <= 1
    magnitude = weight * make_mask(weight.abs(), pattern)
    error = lambda w: (x @ (weight - w).T).pow(2).sum()  # noqa: E731
    assert error(pruned) < 0.8 * error(magnitude)


def _textbook_sparsegpt(weight, hessian, pattern, block_size, damp=0.01):
    """SparseGPT as the paper writes it, one column at a time on the untransposed weight:
    the oracle for the solver's faster loop."""
    w = weight.double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned_so_far = torch.zeros(rows, dtype=torch.long)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        errors = torch.zeros(rows, end - start, dtype=w.dtype)
        prune = torch.zeros(rows, end - start, dtype=torch.bool)
        if pattern.kind == "unstructured":
            saliency = w[:, start:end].pow(2) / torch.diag(hinv)[start:end].pow(2)
            ranks = saliency.argsort(1).argsort(1)
            prune = ranks < (round(pattern.ratio * end) - pruned_so_far)[:, None]
            pruned_so_far += prune.sum(1)
        for i in range(start, end):
            j = i - start
            if pattern.kind == "nm" and j % pattern.m == 0:
                group = w[:, i:i + pattern.m].pow(2) / torch.diag(hinv)[i:i + pattern.m].pow(2)
                prune[:, j:j + pattern.m].scatter_(1, group.topk(pattern.m - pattern.n, 1, largest=False).indices, True)
            error = torch.where(prune[:, j], w[:, i], 0) / hinv[i, i]
            w[:, i:end] -= error[:, None] * hinv[i, i:end][None, :]
            w[:, i] = torch.where(prune[:, j], 0, w[:, i])
            errors[:, j] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w


@pytest.mark.parametrize("spec", ["2:4", "4:8", "unstructured:0.5"])
def test_sparsegpt_solver_equals_the_textbook_column_loop(spec):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(256, 96, generator=generator) * (torch.rand(96, generator=generator) * 3 + 0.1)
    hessian = x.T @ x
    hessian[7], hessian[:, 7] = 0, 0  # a dead input
    weight = torch.randn(40, 96, generator=generator)
    pattern = parse_pattern(spec)
    got = sparsegpt_prune(weight, hessian, pattern, block_size=32)
    expected = _textbook_sparsegpt(weight, hessian, pattern, block_size=32)
    assert torch.equal(got == 0, expected == 0)  # the same weights pruned (exact zeros)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["2:4", "unstructured:0.5"])
def test_sparsegpt_of_stacked_layers_equals_each_layer_alone(spec):
    """q/k/v (gate/up) share a Hessian and are solved as one stacked matrix: rows are independent."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=generator) * (torch.rand(64, generator=generator) + 0.2)
    weights = [torch.randn(rows, 64, generator=generator) for rows in (16, 8, 24)]
    pattern = parse_pattern(spec)
    stacked = sparsegpt_prune(torch.cat(weights), x.T @ x, pattern).split([16, 8, 24])
    for weight, together in zip(weights, stacked):
        alone = sparsegpt_prune(weight, x.T @ x, pattern)
        assert torch.equal(alone == 0, together == 0)
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_hessian_of_bfloat16_inputs_is_the_float32_gram_matrix_and_stays_positive_definite():
    """bf16 inputs are multiplied in bf16 with float32 accumulation (exact for bf16 values);
    rounding each batch's product to bf16 instead broke positive definiteness on inputs
    with one dominant direction, like these."""
    generator = torch.Generator().manual_seed(4)
    direction = torch.randn(384, generator=generator)
    x = (torch.randn(4, 256, 1, generator=generator) * 30 * direction + torch.randn(4, 256, 384, generator=generator))
    x = x.bfloat16()
    weights = torch.rand(4, 256, generator=generator)
    for rows in (None, weights):
        stat = calibration.Hessian(384, "cpu")
        for batch in range(4):
            stat.add(x[batch], None if rows is None else rows[batch])
        inputs = x.float() if rows is None else (x.float() * rows[..., None]).bfloat16().float()
        exact = inputs.reshape(-1, 384).double()
        exact = (exact.T @ exact).float()
        assert stat.value.dtype == torch.float32
        torch.testing.assert_close(stat.value, exact, rtol=1e-4, atol=1e-4 * exact.diagonal().mean().item())
        damped = stat.value.double() + 0.01 * stat.value.diagonal().mean() * torch.eye(384, dtype=torch.float64)
        torch.linalg.cholesky(damped)  # SparseGPT's factorisation succeeds
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # the mode was restored


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", ["2:4", "unstructured:0.5"])
def test_every_method_hits_the_pattern_exactly(model_type, method, spec):
    model = random_model(model_type, dtype=torch.float32)
    windows = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 0
    sparsity = prune_model(model, PruneSettings(method, spec, default_timesteps()[:2]), windows)
    assert len(sparsity) == 7 * model.config.num_layers
    pattern = parse_pattern(spec)
    for name, linear in prunable_linears(model).items():
        if pattern.kind == "nm":
            groups = (linear.weight.reshape(linear.out_features, -1, 4) != 0).sum(-1)
            assert (groups == 2).all(), name
        else:
            zeros = (linear.weight == 0).sum(1).float()
            assert (zeros - 0.5 * linear.in_features).abs().max() <= 1, name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_zero_sink_scores_select_exactly_what_the_base_method_selects(method):
    windows = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(1))
    windows[:, 0] = 0
    base = random_model("llada", dtype=torch.float32)
    sink = random_model("llada", dtype=torch.float32)
    timesteps = default_timesteps()[:3]
    prune_model(base, PruneSettings(method, "2:4", timesteps), windows)
    prune_model(sink, PruneSettings("sink-" + method, "2:4", timesteps), windows, sink_scores=torch.zeros(4, 16))
    for (name, a), b in zip(base.state_dict().items(), sink.state_dict().values()):
        assert torch.equal(a, b), name


def test_sink_scores_change_the_selection():
    windows = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(1))
    base = random_model("llada", dtype=torch.float32)
    sink = random_model("llada", dtype=torch.float32)
    scores = torch.zeros(4, 16)
    scores[:, 0] = 1.0  # BOS fully down-weighted
    prune_model(base, PruneSettings("wanda", "2:4", [0.5]), windows)
    prune_model(sink, PruneSettings("sink-wanda", "2:4", [0.5]), windows, sink_scores=scores)
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), sink.state_dict().values()))


def test_statistics_live_for_one_block_at_a_time(monkeypatch):
    """Memory bounded by one block: earlier blocks' statistics are freed before the next block's exist."""
    alive = weakref.WeakSet()
    peak = {"n": 0}
    original = calibration.STATISTICS["hessian"]

    class Tracked(original):
        def __init__(self, features, device):
            super().__init__(features, device)
            alive.add(self)
            peak["n"] = max(peak["n"], len(alive))

    monkeypatch.setitem(calibration.STATISTICS, "hessian", Tracked)
    from tests.conftest import tiny_hf_config
    from sinkprune.dlm import DLMConfig, build_model

    config = DLMConfig.from_hf_config(tiny_hf_config("llada") | {"n_layers": 12})
    model = build_model(config)
    windows = torch.randint(3, 90, (2, 16))
    prune_model(model, PruneSettings("sparsegpt", "2:4", [0.5]), windows)
    assert peak["n"] == 4  # the distinct inputs of one block (q/k/v share one, gate/up one), never more


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sink-wanda"])
def test_structured_pruning_gives_a_smaller_model_that_saves_and_loads(tmp_path, model_type, method):
    from sinkprune.dlm.loading import load_model, save_model

    model = random_model(model_type, dtype=torch.float32)
    config = model.config
    windows = torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(0))
    prune_model(model, PruneSettings(method, "structured:0.5", [0.5]), windows)
    assert model.config.intermediate_size == config.intermediate_size // 2
    assert model.config.num_kv_heads == config.num_kv_heads // 2
    assert model.config.num_heads == config.num_heads // 2 and model.config.head_dim == config.head_dim
    params = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n or ".layers." in n)
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    save_model(model, tmp_path / "s")
    loaded, _ = load_model(tmp_path / "s", with_tokenizer=False)
    assert loaded.config == model.config
    assert sum(p.numel() for n, p in loaded.named_parameters() if ".blocks." in n or ".layers." in n) == params
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_structured_keeps_the_most_important_channels():
    from sinkprune.structured import prune_block_structured

    model = random_model("llada", dtype=torch.float32)
    block = model.blocks[0]
    stats = {"down": torch.ones(128), "o": torch.ones(64)}
    stats["down"][[5, 77]] = 1e6  # two loud MLP channels must survive
    before_up = block.up_proj.weight.detach().clone()
    prune_block_structured(block, model.linear_roles, model.attention_path, 0.9, stats)
    assert block.up_proj.out_features == 13
    kept_rows = {i for i in range(128) for j in range(13) if torch.equal(before_up[i], block.up_proj.weight[j])}
    assert {5, 77} <= kept_rows


def test_structured_sparsegpt_is_refused():
    with pytest.raises(ValueError, match="structured pruning supports"):
        prune_model(random_model("llada"), PruneSettings("sparsegpt", "structured:0.3"), torch.zeros(1, 4, dtype=torch.long))
