"""Writing the artifact that `prune` produces and `serve` loads (see DESIGN.md).

2:4 layers are stored as compressed-tensors `sparse-24-bitmask` (half the
values plus a one-bit-per-weight mask); other patterns keep dense weights with
zeros. `sinkprune.json` records the method, settings, per-layer sparsity,
quality and the sha256 of every file, so a server can refuse a damaged copy.
The artifact also carries the source model's generation config and remote code.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sinkprune.calibration import prunable_linears
from sinkprune.dlm.artifact_io import BITMASK_FORMAT, MANIFEST, sha256_file
from sinkprune.dlm.loading import converted_state, save_model
from sinkprune.dlm.model import DiffusionLM
from sinkprune.masks import parse_pattern
from sinkprune.safe_output import check_output, staged_output

# The compressed-tensors release whose sparse-24-bitmask layout we write: its last one with that format.
CT_FORMAT_VERSION = "0.14.0"


def compressed_state(model: DiffusionLM, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict, produced one tensor at a time (never a second copy of the model), with
    every prunable linear weight in sparse-24-bitmask form under compressed-tensors' names:
    `<module>.compressed`, `<module>.bitmask`, `<module>.shape` (2, 1)."""
    from sinkkernels.formats import to_bitmask

    targets = {name + ".weight": name for name in prunable_linears(model)}
    for name, tensor in converted_state(model, dtype):
        if name not in targets:
            yield name, tensor
            continue
        compressed, bitmask, shape = to_bitmask(tensor, name=name)
        module = targets[name]
        yield from ((module + ".compressed", compressed), (module + ".bitmask", bitmask),
                    (module + ".shape", shape.reshape(-1, 1)))


def sparsity_config(targets: list[str], sparsity: float | None) -> dict:
    """config.json's `quantization_config` for 2:4 layers, with the fields compressed-tensors writes."""
    return {"quant_method": "compressed-tensors", "version": CT_FORMAT_VERSION, "transform_config": {},
            "sparsity_config": {"format": BITMASK_FORMAT, "sparsity_structure": "2:4", "targets": targets,
                                "ignore": [], "global_sparsity": sparsity, "registry_requires_subclass": False}}


def write_artifact(
    model: DiffusionLM,
    out_dir: str | Path,
    tokenizer,
    manifest: dict,
    dtype: torch.dtype | None = None,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Save a pruned model as an artifact; `manifest` must hold at least `pattern`.

    The artifact appears whole or not at all (`staged_output`): a non-empty `out_dir` is
    refused unless `overwrite` (then replaced entirely), and so is one equal to, inside or
    containing `source_dir`, the model it was pruned from, whose remote code and
    generation config it carries."""
    sources = [source_dir] if source_dir is not None else []
    with staged_output(out_dir, overwrite, sources) as staging:
        _write(model, staging, tokenizer, manifest, dtype, source_dir, progress)
    return check_output(out_dir, overwrite=True)


def _write(model: DiffusionLM, out: Path, tokenizer, manifest: dict, dtype: torch.dtype | None,
           source_dir: str | Path | None, progress: bool) -> None:
    pattern = parse_pattern(manifest["pattern"])
    extra_config = None
    state, count = converted_state(model, dtype), len(model.state_dict())
    if pattern.kind == "nm" and (pattern.n, pattern.m) == (2, 4):
        state, targets = compressed_state(model, dtype), list(prunable_linears(model))
        count += 2 * len(targets)  # each weight becomes three tensors
        extra_config = {"quantization_config": sparsity_config(targets, manifest.get("sparsity"))}
    state = tqdm(state, desc="write", total=count, unit="tensor", disable=not progress)
    save_model(model, out, tokenizer=tokenizer, dtype=dtype, state=state, extra_config=extra_config,
               source_dir=source_dir)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    (out / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
