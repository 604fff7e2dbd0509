"""A random-weight checkpoint of a public model's shape with fewer blocks, written the
way the public checkpoints are (sharded safetensors + index, config.json, tokenizer):
`python -m benchmarks.random_checkpoint --preset llada-8b --layers 2 --out runs/llada8b-2`.

Full width and vocabulary, so every per-layer cost (statistics, one batch, the
embedding and head) is the real one; fewer blocks, so it fits a small machine.
Tensors are generated and written one shard at a time: writing it needs about
one shard of memory, not the model. The tokenizer is the embedded model's (its
ids are all below the preset's vocabulary); the mask id stays the preset's.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from sinkprune.dlm import DLMConfig, build_model
from sinkprune.dlm.loading import DEFAULT_SHARD_BYTES, embedded_model_dir, save_model
from sinkprune.dlm.presets import PRESETS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def random_tensors(model: torch.nn.Module, dtype: torch.dtype, seed: int):
    """(name, tensor) for every parameter of a meta-device model, made when asked for:
    norms are ones, the rest N(0, 0.02) like a fresh initialisation."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.state_dict().items():
        if param.dim() == 1:
            yield name, torch.ones(param.shape, dtype=dtype)
        else:
            yield name, (torch.randn(param.shape, generator=generator) * 0.02).to(dtype)


def write_random_checkpoint(out_dir: str | Path, preset: str = "llada-8b", layers: int = 2,
                            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            seed: int = 0, overrides: dict | None = None) -> Path:
    """Write the checkpoint and return its directory; `overrides` change config fields (e.g. a
    smaller width for a test) after the preset's and the layer count."""
    hf = {**PRESETS[preset], **_layer_field(preset, layers), **(overrides or {})}
    config = DLMConfig.from_hf_config(hf)
    model = build_model(config, device="meta", dtype=dtype)
    out = save_model(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     state=random_tensors(model, dtype, seed))
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_model_dir() / name, out / name)
    return out


def _layer_field(preset: str, layers: int) -> dict:
    return {"n_layers": layers} if PRESETS[preset]["model_type"] == "llada" else {"num_hidden_layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.random_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llada-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    out = write_random_checkpoint(args.out, args.preset, args.layers, getattr(torch, args.dtype),
                                  int(args.shard_gib * 2**30))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
