"""The architectures: checkpoint-compatible names, save/load, padding, attention mass."""
from __future__ import annotations

import json

import pytest
import torch

from sinkprune.dlm import DLMConfig, build_model, load_model, save_model
from sinkprune.dlm.config import ConfigError
from sinkprune.dlm.layers import grouped_sdpa
from sinkprune.dlm.loading import ModelLoadError
from sinkprune.dlm.presets import DREAM_7B as DREAM_7B_CONFIG
from sinkprune.dlm.presets import LLADA_8B as LLADA_8B_CONFIG
from tests.conftest import VOCAB, random_model, tiny_hf_config

def llada_8b_expected() -> dict[str, tuple[int, ...]]:
    """The tensor table of the LLaDA-8B safetensors index."""
    table = {"model.transformer.wte.weight": (126464, 4096), "model.transformer.ln_f.weight": (4096,),
             "model.transformer.ff_out.weight": (126464, 4096)}
    for i in range(32):
        block = f"model.transformer.blocks.{i}."
        table.update({block + "q_proj.weight": (4096, 4096), block + "k_proj.weight": (4096, 4096),
                      block + "v_proj.weight": (4096, 4096), block + "attn_out.weight": (4096, 4096),
                      block + "ff_proj.weight": (12288, 4096), block + "up_proj.weight": (12288, 4096),
                      block + "ff_out.weight": (4096, 12288), block + "attn_norm.weight": (4096,),
                      block + "ff_norm.weight": (4096,)})
    return table


def dream_7b_expected() -> dict[str, tuple[int, ...]]:
    """The tensor table of the Dream-v0-7B safetensors index (Qwen2-7B shapes)."""
    table = {"model.embed_tokens.weight": (152064, 3584), "model.norm.weight": (3584,),
             "lm_head.weight": (152064, 3584)}
    for i in range(28):
        layer = f"model.layers.{i}."
        table.update({layer + "self_attn.q_proj.weight": (3584, 3584), layer + "self_attn.q_proj.bias": (3584,),
                      layer + "self_attn.k_proj.weight": (512, 3584), layer + "self_attn.k_proj.bias": (512,),
                      layer + "self_attn.v_proj.weight": (512, 3584), layer + "self_attn.v_proj.bias": (512,),
                      layer + "self_attn.o_proj.weight": (3584, 3584),
                      layer + "mlp.gate_proj.weight": (18944, 3584), layer + "mlp.up_proj.weight": (18944, 3584),
                      layer + "mlp.down_proj.weight": (3584, 18944),
                      layer + "input_layernorm.weight": (3584,), layer + "post_attention_layernorm.weight": (3584,)})
    return table


@pytest.mark.parametrize("hf, expected", [(LLADA_8B_CONFIG, llada_8b_expected()), (DREAM_7B_CONFIG, dream_7b_expected())])
def test_full_size_state_dict_matches_public_checkpoint(hf, expected):
    model = build_model(DLMConfig.from_hf_config(hf), device="meta", dtype=torch.bfloat16)
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == expected
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_llada_8b_parameter_count():
    model = build_model(DLMConfig.from_hf_config(LLADA_8B_CONFIG), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184


def test_config_round_trip_keeps_native_keys(model_type):
    config = DLMConfig.from_hf_config(tiny_hf_config(model_type))
    again = DLMConfig.from_hf_config(config.to_hf_config())
    assert again == config
    native_key = "d_model" if model_type == "llada" else "hidden_size"
    assert native_key in config.to_hf_config()


def test_config_keeps_every_eos_id_of_a_list(model_type):
    config = DLMConfig.from_hf_config({**tiny_hf_config(model_type), "eos_token_id": [1, 7]})
    assert config.eos_token_id == 1 and config.eos_token_ids == (1, 7)
    assert config.to_hf_config()["eos_token_id"] == [1, 7]
    assert DLMConfig.from_hf_config(config.to_hf_config()) == config
    single = DLMConfig.from_hf_config(tiny_hf_config(model_type))
    assert single.eos_token_ids == (1,) and single.to_hf_config()["eos_token_id"] == 1


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_save_and_load_give_identical_logits(tmp_path, model_type, shard_bytes):
    model = random_model(model_type, dtype=torch.float32)
    save_model(model, tmp_path / "m", max_shard_bytes=shard_bytes)
    if shard_bytes:
        index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_model(tmp_path / "m", with_tokenizer=False)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_keeps_checkpoint_dtype_unless_asked(tmp_path, model_type):
    save_model(random_model(model_type), tmp_path / "m", dtype=torch.bfloat16)
    assert next(load_model(tmp_path / "m", with_tokenizer=False)[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(tmp_path / "m", dtype=torch.float32, with_tokenizer=False)[0].parameters()).dtype == torch.float32


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'"):
        DLMConfig.from_hf_config({"model_type": "gpt2"})
    model = random_model("llada")
    save_model(model, tmp_path / "m")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    broken = dict(state)
    del broken["model.transformer.blocks.1.up_proj.weight"]
    save_file(broken, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"blocks\.1\.up_proj\.weight"):
        load_model(tmp_path / "m", with_tokenizer=False)
    broken = dict(state)
    broken["model.transformer.ln_f.weight"] = torch.ones(3)
    save_file(broken, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"ln_f\.weight has shape \(3,\)"):
        load_model(tmp_path / "m", with_tokenizer=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(model_type, side):
    model = random_model(model_type)
    rows = [torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    width = 9
    ids = torch.full((2, width), 94)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, sl], mask[r, sl] = row, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for r, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            torch.testing.assert_close(batched[r, sl], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_at_positions_equal_those_of_every_position(model_type, padded):
    """The head on chosen positions only (what the engine asks for: a block) gives exactly those positions'
    logits, Dream's shift and a left-padded row's first real token included."""
    model = random_model(model_type)
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]) if padded else None
    at = torch.tensor([[3, 4, 5, 6], [0, 1, 7, 7]])
    with torch.no_grad():
        every = model(ids, attention_mask=mask).logits
        some = model(ids, attention_mask=mask, logits_at=at).logits
    assert some.shape == (2, 4, every.shape[-1])
    torch.testing.assert_close(some, every.gather(1, at[..., None].expand(-1, -1, every.shape[-1])),
                               rtol=1e-6, atol=1e-6)


def test_attention_mass_path_matches_fast_path_and_sums(model_type):
    model = random_model(model_type)
    ids = torch.randint(0, 90, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        fast = model(ids, attention_mask=mask)
        slow = model(ids, attention_mask=mask, output_attention_mass=True)
    assert fast.attention_mass is None
    torch.testing.assert_close(fast.logits, slow.logits)
    heads = model.config.num_heads
    for mass in slow.attention_mass:
        assert mass.shape == (2, 7)
        # every real query spreads probability 1 per head over the keys; pads receive none
        torch.testing.assert_close(mass.sum(-1), torch.tensor([5.0 * heads, 7.0 * heads], dtype=mass.dtype))
        assert torch.all(mass[0, :2] == 0)


def test_dream_logits_are_shifted_right():
    model = random_model("dream")
    ids = torch.randint(0, 90, (1, 6))
    with torch.no_grad():
        hidden = model.embed(ids)
        inputs = model.attention_inputs(ids)
        for block in model.blocks:
            hidden, _ = block(hidden, inputs)
        raw = model.head(hidden)
        shifted = model(ids).logits
    torch.testing.assert_close(shifted[:, 1:], raw[:, :-1])
    torch.testing.assert_close(shifted[:, 0], raw[:, 0])


def test_no_causal_mask_future_tokens_change_earlier_logits():
    model = random_model("llada")
    ids = torch.randint(0, 90, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 90
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])


def test_hf_directory_with_tokenizer_round_trips(tmp_path, model_type):
    from sinkprune.dlm.loading import load_tokenizer
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR

    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config(model_type) | {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    hf.pop("embedding_size", None)
    model = build_model(DLMConfig.from_hf_config(hf))
    out = save_model(model, tmp_path / model_type, tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded, loaded_tokenizer = load_model(out)
    text = "SELECT name FROM pg_class; the function returns None."
    ids = torch.tensor([loaded_tokenizer(text)["input_ids"]])
    assert ids[0].tolist() == tokenizer(text)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_causal_analysis_mode_hides_the_future(model_type):
    model = random_model(model_type)
    ids = torch.randint(0, 90, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 90
    with torch.no_grad():
        a = model(ids, causal=True, output_attention_mass=True)
        b = model(changed, causal=True)
        fast = model(ids, causal=True)
    unaffected = 6 if model_type == "dream" else 5  # Dream's position i shows the logit of i-1
    torch.testing.assert_close(a.logits[0, :unaffected], b.logits[0, :unaffected])
    assert not torch.allclose(a.logits[0, unaffected - 1], model(changed).logits[0, unaffected - 1])
    torch.testing.assert_close(a.logits, fast.logits)
    # query i attends to i+1 keys: key j receives mass from the (L - j) queries at or after it
    heads = model.config.num_heads
    assert a.attention_mass[0][0, -1].item() < heads + 1e-9


@pytest.mark.parametrize("groups", [1, 2, 7])
@pytest.mark.parametrize("mask_queries", [1, 5])  # a key mask for every query, or one per query (causal check)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_equals_attention_over_repeated_keys_and_values(groups, mask_queries, dtype):
    """GQA reads each key/value head once (query heads stacked along the query axis), bit for bit what SDPA over
    keys and values repeated per query head gives."""
    generator = torch.Generator().manual_seed(groups)
    batch, kv_heads, queries, keys, head_dim = 3, 2, 5, 37, 16
    q = torch.randn(batch, kv_heads * groups, queries, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype) for _ in range(2))
    mask = torch.rand(batch, 1, mask_queries, keys, generator=generator) > 0.3
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=mask)
    assert torch.equal(grouped_sdpa(q, k, v, mask), expected)
    assert torch.equal(grouped_sdpa(q, k, v, None), torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)))
