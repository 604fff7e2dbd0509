"""Build, save and load diffusion LMs in the Hugging Face directory layout.

A model directory is `config.json` + `model.safetensors` (or shards with
`model.safetensors.index.json`) + tokenizer files; this is how LLaDA-8B and
Dream-7B ship, so a local copy of either loads with no conversion. Weights are
loaded with `assign=True` into a model built on the meta device, so an 8B
model is never allocated twice.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from safetensors.torch import load_file

from sinkprune.dlm.artifact_io import decompress_state, load_packed_state, verify_model_dir
from sinkprune.dlm.config import DREAM, LLADA, DLMConfig
from sinkprune.dlm.dream import DreamModel
from sinkprune.dlm.errors import ConfigError, ModelLoadError
from sinkprune.dlm.hf_files import make_tokenizer_config_portable, write_hf_files
from sinkprune.dlm.llada import LLaDAModelLM
from sinkprune.dlm.model import DiffusionLM
from sinkprune.safe_output import set_normal_modes

ARCHITECTURES: dict[str, type[DiffusionLM]] = {LLADA: LLaDAModelLM, DREAM: DreamModel}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EMBEDDED_NAME = "embedded"
# what save_model writes (without a source_dir's remote code), less the weight shards: see saved_model_names
SAVED_FILES = ("config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE, "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 2**30  # shards of 2 GiB, like the public checkpoints' few-GB files


def build_model(config: DLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """Instantiate the architecture for `config`; on `device="meta"` nothing is allocated."""
    with torch.device(device):
        model = ARCHITECTURES[config.model_type](config)
    return model.to(dtype=dtype)


def embedded_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "embedded" / "model"


def resolve_model_dir(path_or_name: str | Path) -> Path:
    """`embedded` names the shipped default model; anything else is a local directory."""
    if str(path_or_name) == EMBEDDED_NAME:
        path = embedded_model_dir()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded model is not in this installation (expected {path})")
        return path
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (give a local HF-layout directory or 'embedded')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelLoadError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def read_config(model_dir: Path) -> DLMConfig:
    return config_from(model_dir / "config.json", read_json(model_dir / "config.json"))


def config_from(path: Path, hf_config: dict) -> DLMConfig:
    """The DLMConfig of the config.json at `path` (its dtype checked too); ConfigError naming the file."""
    try:
        config = DLMConfig.from_hf_config(hf_config)
        config_dtype(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards, or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        for name in weight_map.values():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise ModelLoadError(f"{index}: weight_map names {name!r}, not a file name in {model_dir}")
        shards = sorted(set(weight_map.values()))
        files = [model_dir / name for name in shards]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"weight shard {file.name} listed in {INDEX_FILE} is missing from {model_dir}")
    return files


def read_state_dict(model_dir: Path, device: str | torch.device = "cpu",
                    files: list[Path] | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files if files is not None else weight_files(model_dir):
        try:
            state.update(load_file(str(file), device=str(device)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise ModelLoadError(f"weight file {file} cannot be read (truncated or corrupt?): {err}") from err
    return state


def check_state_dict(model: DiffusionLM, state: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors do not match the architecture, naming them."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s), first: {', '.join(missing[:3])}")
    if unexpected:
        raise ModelLoadError(f"checkpoint has {len(unexpected)} unexpected tensor(s), first: {', '.join(unexpected[:3])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(state[name].shape)}, the config expects {shape}")


STORED_DTYPES = ("float32", "bfloat16", "float16", "float64")


def config_dtype(config: DLMConfig) -> torch.dtype:
    name = config.hf_config.get("torch_dtype") or config.hf_config.get("dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in STORED_DTYPES:
        raise ConfigError(f"torch_dtype {name!r} is not one of {', '.join(STORED_DTYPES)}")
    return getattr(torch, name)


def load_model(
    path_or_name: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    allow_unverified: bool = False,
    progress: bool = False,
    packed: bool = False,
):
    """Load `(model, tokenizer)` from a local HF-layout directory, a pruned artifact
    (hashes verified, 2:4 tensors decompressed and checked) or the name `embedded`.

    `dtype=None` keeps the checkpoint's own dtype; `progress` shows the tensors being
    converted. The model is returned in eval mode.
    A directory that declares a sparsity or quantization config is refused without a
    matching `sinkprune.json` unless `allow_unverified` (then with a warning).
    `packed` (serving): the 2:4 layers are loaded as `Packed24Linear`, packed straight from
    their bitmask, never dense; such a model runs once `serve.engine.prepare.prepare_for_serving`
    has given each the form its plan runs from.
    """
    model_dir = resolve_model_dir(path_or_name)
    hf_config = read_json(model_dir / "config.json")
    index = [model_dir / INDEX_FILE] if (model_dir / INDEX_FILE).is_file() else []
    verify_model_dir(model_dir, hf_config, lambda: [model_dir / "config.json", *index, *weight_files(model_dir)],
                     allow_unverified)
    config = config_from(model_dir / "config.json", hf_config)
    files = weight_files(model_dir)
    dtype = dtype or config_dtype(config)
    model = build_model(config, device="meta", dtype=dtype)
    state = read_state_dict(model_dir, device, files)
    state = (load_packed_state(model, state, config.hf_config, dtype, device) if packed
             else decompress_state(state, config.hf_config))
    check_state_dict(model, state)
    # one tensor at a time: the checkpoint's copy is freed as its converted one appears
    for name in tqdm(list(state), desc="load", unit="tensor", disable=not progress, delay=2):  # only if slow
        state[name] = state[name].to(dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
    return model, tokenizer


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer through `transformers`, never executing remote code.

    A `tokenizer.json` is loaded directly as a fast tokenizer (with the special
    tokens of `tokenizer_config.json`): that covers our models, LLaDA's, and
    Dream's, whose custom tokenizer class AutoTokenizer cannot build without
    `trust_remote_code`. Other layouts go through AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise ModelLoadError(f"no usable tokenizer in {model_dir}: {err}") from err


def saved_model_names(directory: str | Path) -> list[str]:
    """The names save_model writes (SAVED_FILES) with the weight shards now in `directory`: what an
    `--overwrite` of a model directory written by us may replace."""
    directory = Path(directory).expanduser()
    shards = [p.name for p in directory.glob("model-*-of-*.safetensors")] if directory.is_dir() else []
    return [*SAVED_FILES, *shards]


def save_model(
    model: DiffusionLM,
    out_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    state: Iterable[tuple[str, torch.Tensor]] | None = None,
    extra_config: dict | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write `model` (and tokenizer) as a checkpoint-style directory, sharded above
    `max_shard_bytes` with an index exactly like the public checkpoints'.

    Tensors are converted and written one at a time, so writing holds one
    tensor beyond the model, never a second copy of the weights;
    `max_shard_bytes=None` writes one file whatever its size.

    `state`, (name, tensor) pairs produced lazily, replaces the model's own tensors (e.g. compressed ones) and
    `extra_config` is merged into config.json (e.g. a `quantization_config`).
    The directory also gets generation_config.json and, from `source_dir` (the
    model it came from), its remote-code modules; config.json keeps `auto_map`.
    Files get the modes of a plain open() (safetensors writes 0600)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, converted_state(model, dtype) if state is None else state, max_shard_bytes)
    hf = model.config.to_hf_config()
    hf["torch_dtype"] = str(dtype or model.embed_weight.dtype).replace("torch.", "")
    hf.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    write_hf_files(out, hf, Path(source_dir) if source_dir is not None else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        make_tokenizer_config_portable(out)
    set_normal_modes(p for p in out.iterdir() if p.is_file())
    return out


def converted_state(model: DiffusionLM, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors in `dtype` on the CPU, converted one at a time as they are asked for."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach().to(dtype=dtype or tensor.dtype).contiguous().cpu()


def _write_shards(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int | None) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when the tensors
    exceed `max_shard_bytes`. Each tensor's bytes go to disk as it arrives (`_ShardFile`),
    so writing holds one tensor beyond the model, whatever the shard size."""
    written: list[tuple[Path, list[str]]] = []
    shard: _ShardFile | None = None
    total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard is not None and max_shard_bytes and shard.size and shard.size + nbytes > max_shard_bytes:
            written.append(shard.close())
            shard = None
        if shard is None:
            shard = _ShardFile(out / f".shard-{len(written) + 1:05d}.safetensors")
        shard.add(name, tensor)
        total += nbytes
    written.append((shard or _ShardFile(out / ".shard-00001.safetensors")).close())
    if len(written) == 1:
        written[0][0].rename(out / SINGLE_FILE)
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / final)
        weight_map.update({name: final for name in names})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class _ShardFile:
    """One safetensors file written tensor by tensor. The format puts the header (every
    name, dtype, shape, offset) before the data, so the bytes go to an unlinked scratch
    file as each tensor arrives and are copied behind the header on `close`: disk does
    the buffering, memory holds one tensor (safetensors' own `save_file` serialises
    the whole shard in memory first)."""

    def __init__(self, path: Path):
        self.path, self.size, self.header = path, 0, {"__metadata__": {"format": "pt"}}
        self.data = tempfile.TemporaryFile(dir=path.parent)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + nbytes]}
        if nbytes:
            self.data.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.size += nbytes

    def close(self) -> tuple[Path, list[str]]:
        header = json.dumps(self.header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            self.data.seek(0)
            shutil.copyfileobj(self.data, handle, 1 << 24)
        self.data.close()
        return self.path, [name for name in self.header if name != "__metadata__"]
