"""cuSPARSELt with plans made once: our small C++ extension (`csrc/cusparselt_linear.cpp`).

PyTorch's semi-structured path rebuilds cuSPARSELt's descriptors and plan on every
call (about 0.8 ms on an H200 whatever the size, which hid every sparse speed-up).
Here the weight is compressed once at load and a plan per (N, K, padded M, dtype) is
built once, shared by every layer of that shape, and reused; a call is a single
`cusparseLtMatmul` on the current stream, so it records into CUDA graphs.

The extension is compiled at first use on the machine that serves (nvcc or a host
compiler, ninja, the cuSPARSELt header and library of the CUDA wheels PyTorch ships
with), cached under `~/.cache/sinkserve/extensions` keyed by the source and torch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cusparselt_linear.cpp"
ENV_PATH = "CUSPARSELT_PATH"  # a folder with include/cusparseLt.h and lib/libcusparseLt.so*
ENV_CACHE = "SINKSERVE_EXTENSION_DIR"
ENV_ALGORITHMS = "SINKSERVE_CUSPARSELT_ALGS"  # a survey's table of algorithm ids (benchmarks.cusparselt_algs)
ROW_MULTIPLE = 16  # cuSPARSELt wants the dense operand's rows (our M) a multiple of 16 for 16-bit types
SHAPE_MULTIPLE = 16  # and the weight's rows and columns too


def _roots() -> list[Path]:
    """Folders that may hold include/cusparseLt.h and lib/libcusparseLt.so*: $CUSPARSELT_PATH, the nvidia
    wheels beside torch (nvidia/cusparselt, nvidia/cu13, ...), then the system's CUDA folders."""
    roots = [Path(os.environ[ENV_PATH])] if os.environ.get(ENV_PATH) else []
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            roots += sorted(p for p in nvidia.iterdir() if p.is_dir())
    return roots + [Path("/usr/local/cuda"), Path("/usr")]


def find_library() -> tuple[Path, Path] | str:
    """(include folder, library file) of cuSPARSELt, or why none was found."""
    for root in _roots():
        header = root / "include" / "cusparseLt.h"
        found = [lib for sub in ("lib", "lib64", "lib/x86_64-linux-gnu")
                 for lib in sorted((root / sub).glob("libcusparseLt.so*"))]
        if header.is_file() and found:
            return header.parent, min(found, key=lambda p: len(p.name))
    return (f"no cuSPARSELt header and library found (looked for include/cusparseLt.h and lib/libcusparseLt.so* "
            f"under ${ENV_PATH}, the nvidia wheels on sys.path, /usr/local/cuda and /usr)")


def unavailable_reason(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> str | None:
    """Why our cuSPARSELt backend cannot run this layer here, or None when it can (the build is tried later)."""
    if device.type != "cuda":
        return (f"the cusparselt backend needs a CUDA GPU, the weight is on {device}; use backend 'dense' on CPU")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the cusparselt backend takes float16 or bfloat16 weights, not {dtype}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"the cusparselt backend needs sparse tensor cores (compute capability 8.0+), this GPU is {capability}"
    if out_features % SHAPE_MULTIPLE or in_features % SHAPE_MULTIPLE:
        return (f"the cusparselt backend needs out_features and in_features multiples of {SHAPE_MULTIPLE}, got a "
                f"({out_features}, {in_features}) weight")
    return _toolchain_reason()


@functools.cache
def _toolchain_reason() -> str | None:
    """Why the extension cannot be built here (no library or no toolkit), or None. Looked up once per process:
    the dispatch asks for every layer of a model."""
    found = find_library()
    if isinstance(found, str):
        return found
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "the cusparselt backend builds a small extension and needs the CUDA toolkit (CUDA_HOME, nvcc)"
    return None


def build_directory() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "sinkserve" / "extensions")
    return base / f"cusparselt-{digest}"


@functools.cache
def extension():
    """The compiled extension (built once per source and torch version; later loads take a second)."""
    found = find_library()
    if isinstance(found, str):
        raise RuntimeError(found)
    include, library = found
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    return load(name="sinkserve_cusparselt", sources=[str(SOURCE)], build_directory=str(directory),
                extra_include_paths=[str(include)], with_cuda=True,
                extra_ldflags=[f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"])


_PLANS: dict[tuple, object] = {}


def padded_rows(m: int) -> int:
    return -(-m // ROW_MULTIPLE) * ROW_MULTIPLE


def plan(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device):
    """The plan shared by every (N, K) weight at M rows, made on first use (never inside a graph capture).

    It runs cuSPARSELt's default algorithm (id 0) unless the table named by $SINKSERVE_CUSPARSELT_ALGS, written
    by `python -m benchmarks.cusparselt_algs --table` on this GPU model with this library version, names another
    for (N, K, M): on an H200 (cuSPARSELt 0.8.0) the library's search and some ids above 0 crashed the process
    (a segfault; docs/BENCHMARKS.md), so only ids that survey ran, in child processes, are ever used."""
    key = (n, k, m, dtype, device.index or 0)
    found = _PLANS.get(key)
    if found is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"cuSPARSELt plan for N={n} K={k} M={m} was not made before CUDA graph capture; "
                               "warm up every shape first")
        table = algorithm_table() if dtype == torch.bfloat16 else None  # the survey measures bf16
        alg = 0 if table is None else choose_algorithm(table, torch.cuda.get_device_name(device),
                                                       extension().version(), n, k, m)
        found = extension().Plan(n, k, m, str(dtype).removeprefix("torch."), alg, device.index or 0)
        _PLANS[key] = found
    return found


def choose_algorithm(table: dict | None, device_name: str, version: str, n: int, k: int, m: int) -> int:
    """The algorithm id for an (N, K, M) bf16 plan: the table's, when it was measured on this GPU model with this
    cuSPARSELt version (ids are not stable across versions), else the default, 0."""
    if table is None:
        return 0
    if (table["device"], table["cusparselt"]) != (device_name, version):
        _warn_mismatch(table["device"], table["cusparselt"], device_name, version)
        return 0
    return table["algorithms"].get(f"{n},{k},{m}", 0)


@functools.cache
def _warn_mismatch(table_device: str, table_version: str, device_name: str, version: str) -> None:
    print(f"warning: ${ENV_ALGORITHMS} was measured on {table_device} with cuSPARSELt {table_version}, this is "
          f"{device_name} with {version}: every plan runs the default algorithm", file=sys.stderr)


def algorithm_table_digest() -> str | None:
    """A short digest of the algorithm table in force (None without one): dispatch measured under other
    algorithms must not be reused."""
    table = algorithm_table()
    return None if table is None else hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:10]


@functools.cache
def algorithm_table() -> dict | None:
    """The table named by $SINKSERVE_CUSPARSELT_ALGS, checked, or None when unset."""
    path = os.environ.get(ENV_ALGORITHMS)
    if not path:
        return None
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise RuntimeError(f"${ENV_ALGORITHMS}={path}: cannot read the cuSPARSELt algorithm table: {error}") from None
    algorithms = table.get("algorithms") if isinstance(table, dict) else None
    if not (isinstance(table, dict) and isinstance(table.get("device"), str)
            and isinstance(table.get("cusparselt"), str) and isinstance(algorithms, dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in algorithms.values())):
        raise RuntimeError(f"${ENV_ALGORITHMS}={path}: expected {{\"device\": str, \"cusparselt\": str, "
                           f"\"algorithms\": {{\"N,K,M\": id >= 0}}}} as `benchmarks.cusparselt_algs --table` "
                           "writes it")
    return table


class CusparseLtWeight:
    """A 2:4 weight compressed for cuSPARSELt; calling it runs `x (M, K) @ W^T (+ bias)`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.n, self.k = weight.shape
        self.dtype, self.device = weight.dtype, weight.device
        with torch.cuda.device(weight.device):
            self.compressed = extension().compress(weight.contiguous())

    @property
    def nbytes(self) -> int:
        return self.compressed.numel()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        rows = padded_rows(m)
        x = torch.nn.functional.pad(x, (0, 0, 0, rows - m)) if rows != m else x.contiguous()
        out = torch.empty(rows, self.n, dtype=self.dtype, device=self.device)
        plan(self.n, self.k, rows, self.dtype, self.device).run(self.compressed, x, out)
        y = out[:m] if rows != m else out
        return y if bias is None else y + bias
