"""Runs inside the compressed-tensors 0.14 virtual environment (never the project's):
its own code reads our artifact and writes a checkpoint of its own.

    python ct014.py decompress ARTIFACT_DIR OUT.safetensors
        config.json's quantization_config parsed by ModelCompressor.from_compression_config
        (what transformers' compressed-tensors integration does), then every tensor of the
        artifact through its sparse-24-bitmask decompressor, written to OUT.safetensors.
    python ct014.py tokenize MODEL_DIR TEXT
        the ids of TEXT by AutoTokenizer (transformers 4.x) from MODEL_DIR, as JSON on stdout.
    python ct014.py compress DENSE_DIR OUT_DIR TARGET [TARGET ...]
        the dense 2:4 weights of DENSE_DIR compressed by its Sparse24BitMaskCompressor for the
        TARGET modules, config.json copied and its quantization_config written by
        ModelCompressor.update_config.
"""
import json
import shutil
import sys
from pathlib import Path

from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from safetensors.torch import load_file, save_file


def decompress(artifact: Path, out: Path) -> None:
    config = json.loads((artifact / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    assert compressor is not None and compressor.sparsity_compressor is not None, config
    tensors = dict(compressor.sparsity_compressor.decompress(str(artifact)))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out))


def compress(dense: Path, out: Path, targets: list[str]) -> None:
    state = load_file(str(dense / "model.safetensors"))
    config = Sparse24BitMaskConfig(targets=targets, sparsity_structure="2:4", global_sparsity=0.5)
    compressor = ModelCompressor(sparsity_config=config)
    compressed = compressor.sparsity_compressor.compress(state, compression_targets=set(targets))
    out.mkdir(parents=True)
    save_file(compressed, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(dense / "config.json", out / "config.json")
    compressor.update_config(str(out))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "decompress":
        decompress(Path(args[0]), Path(args[1]))
    elif mode == "tokenize":
        from transformers import AutoTokenizer

        print(json.dumps(AutoTokenizer.from_pretrained(args[0]).encode(args[1], add_special_tokens=False)))
    else:
        compress(Path(args[0]), Path(args[1]), args[2:])
