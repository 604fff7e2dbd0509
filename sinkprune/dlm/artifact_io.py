"""Reading pruned artifacts: verification, and 2:4 bitmask layers decompressed or loaded packed.

An artifact is a model directory plus `sinkprune.json` (sha256 of every file)
and, for 2:4 layers, compressed-tensors `sparse-24-bitmask` tensors declared
under `quantization_config.sparsity_config` in config.json. Two key layouts are
read: compressed-tensors' own (`<module>.compressed`, `<module>.bitmask`,
`<module>.shape`, shape stored as (2, 1)), which is what we write, and the one
this project wrote before (`<module>.weight.compressed`, ..., shape (2,)).

A directory whose config.json declares a sparsity or quantization config must
carry a manifest, and every file it loads must be listed there with its hash;
otherwise it is refused before a model is built, with the file named, unless the
caller asks for an unverified load (then a warning says so).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sinkprune.dlm.errors import ArtifactError

MANIFEST = "sinkprune.json"
BITMASK_FORMAT = "sparse-24-bitmask"
SUFFIXES = (".compressed", ".bitmask", ".shape")
UNVERIFIED_HINT = "pass --unverified (allow_unverified=True) to load it anyway"


class UnverifiedLoadWarning(UserWarning):
    """A model directory loaded without (full) verification because the caller asked for it."""


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
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text: {err}") from err
    except (OSError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a JSON {type(manifest).__name__}, not an object")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: `files` is a JSON {type(files).__name__}, not an object of file name -> sha256")
    for name, expected in files.items():
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ArtifactError(f"{path}: `files` lists {name!r}, not a file name in the artifact directory")
        if not isinstance(expected, str):
            raise ArtifactError(f"{path}: the sha256 of {name} is a JSON {type(expected).__name__}, not a string")
        file = model_dir / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {name} listed in {MANIFEST} is missing from {model_dir}")
        if sha256_file(file) != expected:
            raise ArtifactError(f"artifact file {name} does not match its sha256 in {MANIFEST} (corrupted or truncated)")
    return manifest


def declared_compression(hf_config: dict) -> str | None:
    """What config.json declares that changes how the weights must be read, or None."""
    if hf_config.get("quantization_config"):
        quant = hf_config["quantization_config"]
        return f"quantization_config ({quant.get('quant_method', '?') if isinstance(quant, dict) else quant})"
    if hf_config.get("sparsity_config"):
        return "sparsity_config"
    return None


def verify_model_dir(model_dir: Path, hf_config: dict, loaded_files: Callable[[], Iterable[Path]],
                     allow_unverified: bool = False) -> dict | None:
    """Verify a directory before its weights are read; returns its manifest (None if it has none).

    Refused (ArtifactError naming the file) unless `allow_unverified`: a declared sparsity or
    quantization config without `sinkprune.json`; a listed file missing or not matching its hash;
    a file to be loaded (`loaded_files()`: config, index, weights) that the manifest does not list."""
    try:
        manifest = verify_manifest(model_dir)
        if manifest is None:
            declared = declared_compression(hf_config)
            if declared:
                raise ArtifactError(f"{model_dir / 'config.json'} declares {declared} but {model_dir / MANIFEST} "
                                    f"is missing, so its weights cannot be verified; {UNVERIFIED_HINT}")
            return None
        listed = manifest.get("files", {})
        for file in loaded_files():
            if file.name not in listed:
                raise ArtifactError(f"{file} is not listed in {model_dir / MANIFEST} (a stale or foreign file); "
                                    f"{UNVERIFIED_HINT}")
        return manifest
    except ArtifactError as err:
        if not allow_unverified:
            raise
        warnings.warn(f"loading {model_dir} UNVERIFIED: {err}", UnverifiedLoadWarning, stacklevel=3)
        return None


def weight_name(prefix: str) -> str:
    """The dense parameter of a compressed triple: `<module>` (compressed-tensors) or `<module>.weight` (ours before)."""
    return prefix if prefix.endswith(".weight") else prefix + ".weight"


def sparsity_format(hf_config: dict) -> str | None:
    return ((hf_config.get("quantization_config") or {}).get("sparsity_config") or {}).get("format")


def split_compressed(state: dict[str, torch.Tensor], hf_config: dict
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, ...]]]:
    """The tensors stored as they are, and each `<param>.{compressed,bitmask,shape}` triple by the dense
    `<param>` it stands for; ArtifactError for an unsupported format, an incomplete triple or a weight
    stored both ways."""
    fmt = sparsity_format(hf_config)
    if fmt is None:
        return state, {}
    if fmt != BITMASK_FORMAT:
        raise ArtifactError(f"unsupported sparsity format {fmt!r} in config.json (only {BITMASK_FORMAT!r})")
    out = {name: t for name, t in state.items() if not name.endswith(SUFFIXES)}
    triples = {}
    for prefix in sorted({name.rsplit(".", 1)[0] for name in state if name.endswith(SUFFIXES)}):
        parts = [state.get(prefix + suffix) for suffix in SUFFIXES]
        if any(p is None for p in parts):
            raise ArtifactError(f"tensor {prefix} lacks one of {', '.join(prefix + s for s in SUFFIXES)}")
        param = weight_name(prefix)
        if param in out:
            raise ArtifactError(f"tensor {param} is stored both dense and compressed ({prefix}.compressed)")
        triples[param] = tuple(parts)
    return out, triples


def decompress_state(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Replace every `<param>.{compressed,bitmask,shape}` triple by the dense `<param>`,
    refusing any that is not exactly 2:4 along the input dimension."""
    from sinkkernels.formats import check_24, from_bitmask

    out, triples = split_compressed(state, hf_config)
    for param, parts in triples.items():
        try:
            dense = from_bitmask(*parts, name=param)
            check_24(dense, name=param)
        except ValueError as err:
            raise ArtifactError(f"tensor {param}: {err}") from err
        out[param] = dense
    return out


def load_packed_state(model: torch.nn.Module, state: dict[str, torch.Tensor], hf_config: dict,
                      dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Put each 2:4 layer of `state` into `model` (built on the meta device) as a `Packed24Linear`, packed
    straight from its bitmask (values in `dtype`, on `device`) and never dense, with its bias; returns the
    other tensors, to load as usual. A triple that matches no linear of the model, or not its shape, or a
    bitmask that is not exactly 2:4 is refused by name (ArtifactError)."""
    from sinkkernels.swap import load_sparse_linears

    out, triples = split_compressed(state, hf_config)
    tensors = {}
    for param, (compressed, bitmask, shape) in triples.items():
        module = param.removesuffix(".weight")
        tensors.update({f"{module}.compressed": compressed.to(dtype), f"{module}.bitmask": bitmask,
                        f"{module}.shape": shape})
        if f"{module}.bias" in out:
            tensors[f"{module}.bias"] = out.pop(f"{module}.bias")
    try:
        load_sparse_linears(model, tensors, device=device)
    except ValueError as err:
        raise ArtifactError(str(err)) from err
    return out
