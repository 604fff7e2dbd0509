"""Reading pruned artifacts: hash verification and 2:4 bitmask decompression.

An artifact is a model directory plus `sinkprune.json` (sha256 of every file)
and, for 2:4 layers, compressed-tensors `sparse-24-bitmask` tensors
(`<param>.compressed`, `<param>.bitmask`, `<param>.shape`) declared under
`quantization_config.sparsity_config` in config.json. Anything that does not
match is refused before a model is built, with the file or tensor named.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sinkprune.dlm.errors import ArtifactError

MANIFEST = "sinkprune.json"
BITMASK_FORMAT = "sparse-24-bitmask"
SUFFIXES = (".compressed", ".bitmask", ".shape")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(model_dir: Path) -> dict | None:
    """Check every file hash listed in sinkprune.json; returns the manifest (None if absent)."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    for name, expected in manifest.get("files", {}).items():
        file = model_dir / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {name} listed in {MANIFEST} is missing from {model_dir}")
        if sha256_file(file) != expected:
            raise ArtifactError(f"artifact file {name} does not match its sha256 in {MANIFEST} (corrupted or truncated)")
    return manifest


def sparsity_format(hf_config: dict) -> str | None:
    return ((hf_config.get("quantization_config") or {}).get("sparsity_config") or {}).get("format")


def decompress_state(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Replace every `<param>.{compressed,bitmask,shape}` triple by the dense `<param>`,
    refusing any that is not exactly 2:4 along the input dimension."""
    fmt = sparsity_format(hf_config)
    if fmt is None:
        return state
    if fmt != BITMASK_FORMAT:
        raise ArtifactError(f"unsupported sparsity format {fmt!r} in config.json (only {BITMASK_FORMAT!r})")
    from kernels.formats import check_24, from_bitmask

    out = {name: t for name, t in state.items() if not name.endswith(SUFFIXES)}
    params = sorted({name.rsplit(".", 1)[0] for name in state if name.endswith(SUFFIXES)})
    for param in params:
        parts = [state.get(param + suffix) for suffix in SUFFIXES]
        if any(p is None for p in parts):
            raise ArtifactError(f"tensor {param} lacks one of {', '.join(param + s for s in SUFFIXES)}")
        try:
            dense = from_bitmask(*parts)
            check_24(dense, name=param)
        except ValueError as err:
            raise ArtifactError(f"tensor {param}: {err}") from err
        out[param] = dense
    return out
