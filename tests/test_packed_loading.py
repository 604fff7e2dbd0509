"""A replica's load of a 2:4 artifact: packed straight from the bitmask (`load_model(..., packed=True)`), fused
packed, and only the layers whose plan is dense unpacked; the logits are those of the dense detour (load the
artifact decompressed, then prepare it), and a layer a sparse backend serves never holds a dense weight."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from serve.engine.config import EngineConfig
from serve.engine.prepare import prepare_for_serving
from sinkkernels import formats, sparse24
from sinkkernels.sparse24 import Packed24Linear, Sparse24Linear
from sinkprune.artifact import write_artifact
from sinkprune.dlm.artifact_io import MANIFEST, sha256_file
from sinkprune.dlm.errors import ArtifactError
from sinkprune.dlm.loading import load_model
from tests.test_artifact import _pruned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton backend runs
CONFIG = EngineConfig(max_num_seqs=2, max_tokens_per_step=64)
IDS = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv("SINKSERVE_SPARSE_BACKEND", raising=False)


def artifact(tmp_path, model_type: str = "llada"):
    model, _ = _pruned("2:4", model_type)
    return write_artifact(model, tmp_path / "a", None, {"pattern": "2:4"})


def served_logits(path, packed: bool, backend: str | None = None, device: str = "cpu"):
    """Load as a replica (packed) or by the dense detour, prepare for serving, run one pass."""
    model, _ = load_model(path, device=device, with_tokenizer=False, packed=packed)
    prepared = prepare_for_serving(model, CONFIG, sparse=True, backend=backend)
    with torch.inference_mode():
        return model, prepared, model(IDS.to(device)).logits


def test_a_packed_load_holds_no_dense_weight_and_serves_the_dense_detours_logits(tmp_path, model_type):
    out = artifact(tmp_path, model_type)
    model, _ = load_model(out, with_tokenizer=False, packed=True)
    layers = [m for m in model.blocks.modules() if isinstance(m, (nn.Linear, Packed24Linear))]
    assert layers and all(type(m) is Packed24Linear for m in layers)  # every block linear, none dense
    *_, expected = served_logits(out, packed=False)
    served, prepared, logits = served_logits(out, packed=True)
    assert prepared.swapped == []  # on CPU every plan is dense: each fused layer unpacked into nn.Linear
    assert not any(isinstance(m, Packed24Linear) for m in served.modules())
    assert torch.equal(logits, expected)


def test_a_layer_a_sparse_backend_serves_is_never_decompressed(tmp_path, monkeypatch):
    """Triton forced (on the CPU under its interpreter): no bitmask is decompressed and no packed weight
    unpacked from the load to the served model, each layer holds its packed form only, and the logits are
    the detour's."""
    out = artifact(tmp_path)
    _, detour, expected = served_logits(out, packed=False, backend="triton", device=DEVICE)
    decompressed = []
    for module, function in ((formats, "from_bitmask"), (sparse24, "unpack")):
        monkeypatch.setattr(module, function, lambda *args, name="weight", **kwargs: decompressed.append(name))
    model, prepared, logits = served_logits(out, packed=True, backend="triton", device=DEVICE)
    assert decompressed == []
    assert prepared.swapped == detour.swapped and len(prepared.swapped) == 4 * len(model.blocks)
    for name in prepared.swapped:
        layer = model.get_submodule(name)
        assert type(layer) is Sparse24Linear and layer.plan.backends == ("triton",)
        assert layer.held_bytes() == layer.values.nbytes + layer.meta.nbytes
    assert prepared.summary()["sparse_weight_bytes_held"] == detour.summary()["sparse_weight_bytes_held"]
    assert prepared.summary()["sparse_weight_bytes_held_vs_dense"] == pytest.approx(17 / 32, abs=1e-4)  # fp32
    assert torch.equal(logits, expected)


def rewrite_weights(out, change) -> None:
    """Apply `change` to the artifact's tensors and re-hash them: only the change is wrong."""
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)
    (out / MANIFEST).write_text(json.dumps(manifest))


def rename(tensors, old: str, new: str) -> None:
    for suffix in (".compressed", ".bitmask", ".shape"):
        tensors[new + suffix] = tensors.pop(old + suffix)


def three_kept(tensors) -> None:
    bitmask = tensors["model.transformer.blocks.1.ff_out.bitmask"].clone()
    bitmask[0, 0] = 0b00000111  # three kept weights in the first group of 4
    tensors["model.transformer.blocks.1.ff_out.bitmask"] = bitmask


@pytest.mark.parametrize("change, message", [
    (lambda t: rename(t, "model.transformer.blocks.1.ff_out", "model.transformer.blocks.9.ff_out"),
     r"model\.transformer\.blocks\.9\.ff_out match no nn\.Linear"),
    (lambda t: t.update({"model.transformer.blocks.1.ff_out.shape": torch.tensor([[128], [64]])}),
     r"model\.transformer\.blocks\.1\.ff_out: stored shape \[128, 64\] does not match"),
    (three_kept, r"model\.transformer\.blocks\.1\.ff_out: bitmask is not 2:4"),
])
def test_a_bitmask_tensor_that_fits_no_layer_is_refused_by_name(tmp_path, change, message):
    out = artifact(tmp_path)
    rewrite_weights(out, change)
    with pytest.raises(ArtifactError, match=message):
        load_model(out, with_tokenizer=False, packed=True)
