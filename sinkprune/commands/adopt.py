"""`sinkprune adopt`: make a 2:4 checkpoint written by another tool (compressed-tensors'
compressor, llm-compressor, ...) into a verified artifact that `serve` loads.

Such a checkpoint has no `sinkprune.json`, so every loader refuses it unless told to
load it unverified. `adopt` loads it once that way (a warning says so), checks every
2:4 layer, and writes a new artifact with a manifest: the hashes of what was checked.
"""
from __future__ import annotations

import argparse

from sinkprune.cli_args import device, nonempty_path, output_dir
from sinkprune.safe_output import add_overwrite_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adopt", help="write a verified artifact (with sinkprune.json) from a 2:4 checkpoint of "
                                     "another tool", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=nonempty_path,
                   help="the checkpoint directory (sparse-24-bitmask, no sinkprune.json)")
    p.add_argument("--out-dir", required=True, type=output_dir,
                   help="the new artifact; must be new or empty (or --overwrite, over a previous artifact)")
    add_overwrite_flag(p)
    p.add_argument("--device", default="cpu", type=device)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from sinkprune.artifact import write_artifact
    from sinkprune.calibration import prunable_linears
    from sinkprune.cli import UsageError
    from sinkprune.dlm.artifact_io import BITMASK_FORMAT, MANIFEST, sparsity_format
    from sinkprune.dlm.loading import load_model, load_tokenizer, read_json, resolve_model_dir
    from sinkprune.safe_output import check_output

    source = resolve_model_dir(args.model)
    check_output(args.out_dir, args.overwrite, [source])
    if (source / MANIFEST).exists():
        raise UsageError(f"{source} already has a {MANIFEST}: it loads as it is, or is refused for a reason "
                         "that adopting must not hide")
    hf = read_json(source / "config.json")
    quant = hf.get("quantization_config") or {}
    if sparsity_format(hf) != BITMASK_FORMAT or (quant.get("sparsity_config") or {}).get("sparsity_structure") != "2:4":
        raise UsageError(f"{source / 'config.json'} declares no 2:4 {BITMASK_FORMAT} sparsity_config: nothing to "
                         "adopt (a dense checkpoint loads as it is)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unverified load is the point of this command; said below
        model, _ = load_model(source, device=args.device, allow_unverified=True, with_tokenizer=False)
    has_tokenizer = any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(source) if has_tokenizer else None
    per_layer = {name: float((linear.weight == 0).float().mean()) for name, linear in prunable_linears(model).items()}
    manifest = {"base_model": str(source), "method": "adopted", "pattern": "2:4",
                "sparsity": sum(per_layer.values()) / len(per_layer), "per_layer_sparsity": per_layer,
                "adopted": {"source": str(source), "quantization_config": quant}}
    try:
        out = write_artifact(model, args.out_dir, tokenizer, manifest, source_dir=source, overwrite=args.overwrite)
    except ValueError as err:  # a target layer that is not 2:4 (e.g. left dense by the other tool)
        raise UsageError(f"cannot adopt {source}: {err}") from err
    print(f"adopted {source} (loaded without a manifest; every 2:4 layer checked) -> {out}, "
          f"{len(per_layer)} layers at {manifest['sparsity']:.1%}")
    return 0
