"""The 8B path on a small machine: a sharded checkpoint of LLaDA-8B's layout (narrowed
here to run in CI; the full-width run is `benchmarks.bench_prune`, docs/CALIBRATION.md)
pruned with sink-aware Wanda to 2:4 with hidden states on disk, and the memory formula."""
from __future__ import annotations

import json

import torch

from benchmarks.random_checkpoint import write_random_checkpoint
from sinkprune.calibration import prunable_linears
from sinkprune.calibration_memory import calibration_memory, parameter_count
from sinkprune.cli import main
from sinkprune.dlm import DLMConfig, build_model
from sinkprune.dlm.artifact_io import MANIFEST
from sinkprune.dlm.loading import load_model
from sinkprune.dlm.presets import PRESETS

NARROW = {"d_model": 128, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 384, "vocab_size": 4608,
          "embedding_size": 4608, "mask_token_id": 4600, "eos_token_id": 1, "pad_token_id": 1}


def test_a_sharded_bf16_checkpoint_prunes_to_a_24_artifact_with_hidden_states_on_disk(tmp_path):
    source = write_random_checkpoint(tmp_path / "llada", "llada-8b", layers=2, overrides=NARROW,
                                     max_shard_bytes=600_000)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    hidden_dir = tmp_path / "hidden"
    hidden_dir.mkdir()
    code = main(["prune", "--model", str(source), "--method", "sink-wanda", "--pattern", "2:4",
                 "--calibration-windows", "2", "--seq-len", "32", "--every", "25", "--eval-windows", "0",
                 "--hidden-states", "disk", "--hidden-dir", str(hidden_dir), "--calibration-dtype", "float32",
                 "--out-dir", str(tmp_path / "pruned")])
    assert code == 0
    assert list(hidden_dir.iterdir()) == []  # the hidden-state file is gone
    manifest = json.loads((tmp_path / "pruned" / MANIFEST).read_text())
    assert manifest["calibration"]["dtype"] == "float32" and manifest["timesteps"] == [1.0, 0.5]
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"  # calibrated in fp32, written in the stored dtype
    model, _ = load_model(tmp_path / "pruned", with_tokenizer=False)
    assert model.embed_weight.dtype == torch.bfloat16
    for name, linear in prunable_linears(model).items():
        assert ((linear.weight.reshape(linear.out_features, -1, 4) != 0).sum(-1) == 2).all(), name


def test_parameter_count_matches_the_public_architectures():
    for preset in PRESETS.values():
        config = DLMConfig.from_hf_config(preset)
        model = build_model(config, device="meta")
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_memory_formula_at_llada_8b_with_the_papers_defaults():
    config = DLMConfig.from_hf_config(PRESETS["llada-8b"])
    noised = 128 * 10
    in_memory = calibration_memory(config, noised, 4096, 1, torch.bfloat16, "input_square_sum", "device")
    assert in_memory.hidden_states == noised * 4096 * 4096 * 2  # 43 GB of hidden states
    on_disk = calibration_memory(config, noised, 4096, 1, torch.bfloat16, "input_square_sum", "disk")
    assert on_disk.hidden_states == in_memory.hidden_states and on_disk.hidden_resident == 4096 * 4096 * 2
    assert on_disk.in_memory() < 20 * 2**30  # weights + one batch: a 24 GB GPU would do for Wanda
    assert 55 * 2**30 < in_memory.in_memory() < 80 * 10**9  # all on the device: fits an 80 GB GPU, barely
    assert abs(in_memory.weights - 2 * 8.0156e9) < 1e7
    hessians = calibration_memory(config, noised, 4096, 1, torch.bfloat16, "hessian", "disk")
    assert hessians.statistics > 4 * 12288**2  # SparseGPT: the down projection's Hessian alone is 0.6 GB
