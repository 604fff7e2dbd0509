"""Two-way interop with compressed-tensors 0.14, the last release that has the
sparse-24-bitmask format: its decompressor reads our artifacts bit for bit, and we
load the checkpoints its compressor writes.

compressed-tensors 0.14 needs transformers < 5, so it runs in a virtual environment
of its own (tests/interop/requirements-ct014.txt), built once under runs/ and reused
while that file is unchanged; nothing of it touches the project's .venv."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sinkprune.artifact import write_artifact
from sinkprune.calibration import prunable_linears
from sinkprune.dlm.artifact_io import UnverifiedLoadWarning
from sinkprune.dlm.loading import load_model, save_model
from sinkprune.prune import PruneSettings, prune_model
from tests.conftest import random_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "tests" / "interop" / "requirements-ct014.txt"
SCRIPT = ROOT / "tests" / "interop" / "ct014.py"


@pytest.fixture(scope="module")
def ct014_python() -> str:
    """The Python of the compressed-tensors 0.14 environment, built if missing (about a minute)."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    venv = ROOT / "runs" / "interop" / f"ct014-{key}"
    python = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=1200)
        assert install.returncode == 0, f"could not build the compressed-tensors 0.14 environment:\n{install.stderr}"
        (venv / "ready").write_text(key)
    version = subprocess.run([str(python), "-c", "import compressed_tensors; print(compressed_tensors.__version__)"],
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("0.14"), version
    return str(python)


def _ct014(python: str, *args: str) -> str:
    result = subprocess.run([python, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=["llada", "dream"])
def pruned(request):
    model = random_model(request.param, dtype=torch.bfloat16)
    windows = torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(0))
    prune_model(model, PruneSettings("wanda", "2:4", [0.5]), windows)
    return model


def test_their_decompressor_reads_our_artifact_bit_for_bit(ct014_python, pruned, tmp_path):
    artifact = write_artifact(pruned, tmp_path / "ours", None, {"pattern": "2:4", "sparsity": 0.5})
    _ct014(ct014_python, "decompress", artifact, tmp_path / "theirs.safetensors")
    theirs = load_file(str(tmp_path / "theirs.safetensors"))
    ours = pruned.state_dict()
    assert set(theirs) == set(ours)  # e.g. no `.weight.weight`: our keys are theirs
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name


def test_transformers_4_loads_our_artifacts_tokenizer(ct014_python, tmp_path):
    """The artifact's tokenizer_config names a class transformers 4.x knows (5.x writes `TokenizersBackend`)."""
    model, tokenizer = load_model("embedded")
    prune_model(model, PruneSettings("magnitude", "2:4"))
    artifact = write_artifact(model, tmp_path / "ours", tokenizer, {"pattern": "2:4"})
    text = "The function returns a list of tables."
    ids = json.loads(_ct014(ct014_python, "tokenize", artifact, text))
    assert ids == tokenizer.encode(text, add_special_tokens=False) and len(ids) > 3


def test_we_load_a_checkpoint_their_compressor_wrote(ct014_python, pruned, tmp_path):
    dense = save_model(pruned, tmp_path / "dense")
    targets = list(prunable_linears(pruned))
    _ct014(ct014_python, "compress", dense, tmp_path / "theirs", *targets)
    tensors = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    assert f"{targets[0]}.compressed" in tensors and tensors[f"{targets[0]}.shape"].shape == (2, 1)
    quant = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert quant["sparsity_config"]["format"] == "sparse-24-bitmask" and quant["version"].startswith("0.14")
    with pytest.warns(UnverifiedLoadWarning):  # a foreign checkpoint has no sinkprune.json
        loaded, _ = load_model(tmp_path / "theirs", with_tokenizer=False, allow_unverified=True)
    for (name, tensor), reloaded in zip(pruned.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(tensor, reloaded), name
    from sinkprune.cli import main  # adopted, it loads verified, as a replica needs

    assert main(["adopt", "--model", str(tmp_path / "theirs"), "--out-dir", str(tmp_path / "adopted")]) == 0
    adopted, _ = load_model(tmp_path / "adopted", with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), adopted.state_dict().values()))
