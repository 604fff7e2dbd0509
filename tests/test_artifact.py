"""Pruned artifacts: compressed-tensors layout, exact round trip, refusal of damage."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkprune.artifact import write_artifact
from sinkprune.calibration import prunable_linears
from sinkprune.dlm.artifact_io import MANIFEST, sha256_file
from sinkprune.dlm.errors import ArtifactError
from sinkprune.dlm.loading import load_model
from sinkprune.prune import PruneSettings, prune_model
from tests.conftest import random_model


def _pruned(pattern: str, model_type: str = "llada"):
    model = random_model(model_type, dtype=torch.float32)
    windows = torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(0))
    sparsity = prune_model(model, PruneSettings("wanda", pattern, [0.5]), windows)
    return model, sparsity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_artifact_round_trips_bit_for_bit(tmp_path, model_type, dtype):
    model, sparsity = _pruned("2:4", model_type)
    out = write_artifact(model, tmp_path / "a", None, {"method": "wanda", "pattern": "2:4", "sparsity": 0.5}, dtype=dtype)
    loaded, _ = load_model(out, with_tokenizer=False)
    for (name, original), reloaded in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(original.to(dtype), reloaded), name
    config = json.loads((out / "config.json").read_text())
    sparsity_config = config["quantization_config"]["sparsity_config"]
    assert sparsity_config["format"] == "sparse-24-bitmask" and sparsity_config["sparsity_structure"] == "2:4"
    assert set(sparsity_config["targets"]) == set(prunable_linears(model))


def test_bitmask_layout_is_the_compressed_tensors_one(tmp_path):
    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.transformer.blocks.0.q_proj"  # compressed-tensors keys: the module's name, no `.weight`
    assert name + ".weight" not in tensors and name + ".weight.compressed" not in tensors
    dense = model.state_dict()[name + ".weight"]
    bitmask = tensors[name + ".bitmask"]
    expected = np.packbits((dense != 0).numpy(), axis=1, bitorder="little")
    assert bitmask.dtype == torch.uint8 and np.array_equal(bitmask.numpy(), expected)
    compressed = tensors[name + ".compressed"]
    assert compressed.shape == (dense.shape[0], dense.shape[1] // 2)
    assert torch.equal(compressed.flatten(), dense[dense != 0])  # kept values in row order
    shape = tensors[name + ".shape"]
    assert shape.shape == (2, 1) and shape.flatten().tolist() == list(dense.shape)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["sparsity_config"]["format"] == "sparse-24-bitmask"


def test_the_previous_key_layout_still_loads(tmp_path):
    """Artifacts written before the switch to compressed-tensors' names: `<module>.weight.compressed`, shape (2,)."""
    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    tensors = load_file(str(out / "model.safetensors"))
    old = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix in ("compressed", "bitmask", "shape") and not module.endswith(".weight"):
            old[f"{module}.weight.{suffix}"] = tensor.flatten() if suffix == "shape" else tensor
        else:
            old[key] = tensor
    assert any(key.endswith(".weight.shape") for key in old)
    save_file(old, str(out / "model.safetensors"))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(out / "model.safetensors")
    (out / MANIFEST).write_text(json.dumps(manifest))
    loaded, _ = load_model(out, with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_unstructured_artifact_keeps_dense_weights_with_its_manifest(tmp_path):
    model, sparsity = _pruned("unstructured:0.5")
    manifest = {"method": "wanda", "pattern": "unstructured:0.5", "per_layer_sparsity": sparsity}
    out = write_artifact(model, tmp_path / "u", None, manifest)
    loaded, _ = load_model(out, with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    written = json.loads((out / MANIFEST).read_text())
    assert written["per_layer_sparsity"] == sparsity
    assert set(written["files"]) == {"config.json", "generation_config.json", "model.safetensors"}


def test_corrupted_or_truncated_files_are_refused(tmp_path):
    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors does not match its sha256"):
        load_model(out, with_tokenizer=False)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_model(out, with_tokenizer=False)
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_model(out, with_tokenizer=False)


def test_a_mask_breaking_24_is_refused_naming_the_tensor(tmp_path):
    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.transformer.blocks.1.ff_out"
    bitmask = tensors[name + ".bitmask"].clone()
    bitmask[0, 0] = 0b00000111  # three kept weights in the first group of 4
    tensors[name + ".bitmask"] = bitmask
    save_file(tensors, str(weights))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)  # hashes fine: only the pattern is wrong
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"blocks\.1\.ff_out\.weight"):
        load_model(out, with_tokenizer=False)


def test_prune_command_writes_a_loadable_artifact_with_quality(tmp_path):
    from sinkprune.cli import main
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm import DLMConfig, build_model, save_model
    from sinkprune.dlm.loading import load_tokenizer
    from tests.conftest import tiny_hf_config

    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id, "bos_token_id": 0}
    save_model(build_model(DLMConfig.from_hf_config(hf)), tmp_path / "dense", tokenizer=tokenizer)
    code = main(["prune", "--model", str(tmp_path / "dense"), "--method", "sink-wanda", "--pattern", "2:4",
                 "--calibration-windows", "2", "--seq-len", "32", "--diffusion-steps", "4", "--every", "2",
                 "--eval-windows", "2", "--eval-samples", "1", "--out-dir", str(tmp_path / "pruned")])
    assert code == 0
    manifest = json.loads((tmp_path / "pruned" / MANIFEST).read_text())
    assert manifest["method"] == "sink-wanda" and manifest["timesteps"] == [1.0, 0.5]
    assert "vs_dense" in manifest["quality"]["pruned"]
    model, loaded_tokenizer = load_model(tmp_path / "pruned")
    assert loaded_tokenizer is not None
    for name, linear in prunable_linears(model).items():
        assert ((linear.weight.reshape(linear.out_features, -1, 4) != 0).sum(-1) == 2).all(), name
    assert main(["prune", "--model", str(tmp_path / "dense"), "--pattern", "3:2", "--out-dir", str(tmp_path / "x")]) == 2


def test_a_declared_sparsity_config_without_manifest_is_refused_unless_unverified(tmp_path):
    from sinkprune.dlm.artifact_io import UnverifiedLoadWarning

    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    (out / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"declares quantization_config.*sinkprune\.json is missing.*--unverified"):
        load_model(out, with_tokenizer=False)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # a flipped byte nobody can detect without the manifest
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UnverifiedLoadWarning, match="UNVERIFIED"):
        loaded, _ = load_model(out, with_tokenizer=False, allow_unverified=True)
    assert loaded is not None


def test_files_the_manifest_does_not_list_are_refused(tmp_path):
    """Old dense shards and their index beside a new artifact must never be what gets loaded."""
    from sinkprune.dlm.loading import save_model

    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    save_model(model, tmp_path / "shards", max_shard_bytes=20_000)
    for stale in (tmp_path / "shards").glob("model*"):
        (out / stale.name).write_bytes(stale.read_bytes())
    with pytest.raises(ArtifactError, match=r"model\.safetensors\.index\.json is not listed in .*sinkprune\.json"):
        load_model(out, with_tokenizer=False)


def test_truncated_weights_without_manifest_give_an_error_naming_the_file(tmp_path):
    from sinkprune.dlm.errors import ModelLoadError
    from sinkprune.dlm.loading import save_model

    model, _ = _pruned("unstructured:0.5")
    out = save_model(model, tmp_path / "dense")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"\xff" * 64):
        weights.write_bytes(broken)
        with pytest.raises(ModelLoadError, match=r"weight file .*model\.safetensors cannot be read"):
            load_model(out, with_tokenizer=False)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json cannot be read as JSON"):
        load_model(out, with_tokenizer=False)


def test_a_replica_given_an_unverifiable_artifact_fails_at_start_naming_the_file(tmp_path):
    """The deploy README's promise: a half-copied artifact never serves."""
    from serve.replica import ModelReplica

    model, _ = _pruned("2:4")
    out = write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})
    (out / MANIFEST).unlink()
    replica_class = ModelReplica.func_or_class
    with pytest.raises(ArtifactError, match=r"sinkprune\.json is missing"):
        replica_class("pruned", str(out))


def test_adopt_turns_a_foreign_24_checkpoint_into_a_verified_artifact(tmp_path):
    """A checkpoint in compressed-tensors' layout without sinkprune.json (what its compressor writes)
    is refused by the loaders; `sinkprune adopt` checks it once and writes one that loads verified."""
    from sinkprune.cli import main

    model, _ = _pruned("2:4")
    foreign = write_artifact(model, tmp_path / "foreign", None, {"pattern": "2:4"})
    (foreign / MANIFEST).unlink()
    with pytest.raises(ArtifactError):
        load_model(foreign, with_tokenizer=False)
    assert main(["adopt", "--model", str(foreign), "--out-dir", str(tmp_path / "adopted")]) == 0
    loaded, _ = load_model(tmp_path / "adopted", with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    manifest = json.loads((tmp_path / "adopted" / MANIFEST).read_text())
    assert manifest["method"] == "adopted" and abs(manifest["sparsity"] - 0.5) < 1e-6
    assert main(["adopt", "--model", str(tmp_path / "adopted"), "--out-dir", str(tmp_path / "again")]) == 2
    tensors = load_file(str(foreign / "model.safetensors"))
    bitmask = tensors["model.transformer.blocks.0.q_proj.bitmask"].clone()
    bitmask[0, 0] = 0b00000111  # three kept weights in a group: not 2:4
    tensors["model.transformer.blocks.0.q_proj.bitmask"] = bitmask
    save_file(tensors, str(foreign / "model.safetensors"))
    assert main(["adopt", "--model", str(foreign), "--out-dir", str(tmp_path / "broken")]) == 2
    assert not (tmp_path / "broken").exists()
