"""Compile our Triton 2:4 kernel for NVIDIA GPUs without one: `python -m benchmarks.compile_check`.

Why: CI and the developers' machines have no GPU, yet register spills, shared memory
over the limit or a dot that misses the tensor cores only show on one, and they
decide whether the kernel can be fast. Triton compiles to a cubin on any machine
(its wheel ships ptxas and cuobjdump), so every autotune configuration is compiled
here for each target architecture exactly as a launch on a model shape specializes
it (pointers, N, K and row strides divisible by 16), and its cubin is checked:

* no spill: cuobjdump reports 0 bytes of stack (a spill sends registers to local
  memory, whose traffic would swamp the bytes that 2:4 saves);
* shared memory within the architecture's per-block limit;
* the dot runs on tensor cores (`mma.sync`, or `wgmma` on Hopper);
* the weight tiles stream through `cp.async` (asynchronous, pipelined copies).

The small-M kernel (CUDA cores, M <= 16) is compiled too, at each BLOCK_M, and
checked for spills and shared memory.

It says nothing of speed: `python -m benchmarks.bench_kernels` on a GPU does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# capability: (example GPU, shared bytes one block may use, shared bytes per SM)
ARCHITECTURES = {80: ("A100", 163 * 1024, 164 * 1024), 90: ("H100", 227 * 1024, 228 * 1024)}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
SPLIT_KS = (1, 2)
SMALL_M_SIZES = (1, 2, 4, 8, 16)  # BLOCK_M of the small-M kernel
ALIGNED_INTS = ("N", "K", "stride_xm", "stride_vn", "stride_meta_n", "stride_ys", "stride_ym")


@dataclass(frozen=True)
class TileConfig:
    """One autotune configuration of the kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @classmethod
    def parse(cls, text: str) -> TileConfig:
        try:
            return cls(*(int(part) for part in text.split(",")))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"--config {text!r}: expected BLOCK_M,BLOCK_N,BLOCK_K,NUM_WARPS,NUM_STAGES, e.g. 16,64,128,8,4")

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


@dataclass
class CompileReport:
    """What the cubin of one (configuration, architecture, dtype, split-K) compilation uses."""

    arch: int
    dtype: str
    split_k: int
    config: TileConfig
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int
    mma: str
    async_copies: int
    resident_warps: int
    problems: list[str] = field(default_factory=list)


def autotune_configs() -> list[TileConfig]:
    """The kernel's GPU autotune list, as `TileConfig`s."""
    from sinkkernels.triton_sparse24 import GPU_CONFIGS
    return [TileConfig(*values) for values in GPU_CONFIGS]


def _signature(kernel, dtype: str, split_k: int) -> dict[str, str]:  # noqa: ANN001 - a triton JITFunction
    element = DTYPES[dtype]
    pointers = {"x_ptr": element, "xt_ptr": element, "values_ptr": element, "meta_ptr": "u8", "bias_ptr": element,
                "y_ptr": element if split_k == 1 else "fp32"}
    return {param.name: "constexpr" if param.is_constexpr else
            (f"*{pointers[param.name]}" if param.name in pointers else "i32") for param in kernel.params}


def _compile(kernel, dtype: str, split_k: int, arch: int, constants: dict, num_warps: int,  # noqa: ANN001
             num_stages: int):
    """The cubin of `kernel` as a launch on a model shape specializes it (16-divisible pointers and sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(kernel, dtype, split_k)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
               if name.endswith("_ptr") or name in ALIGNED_INTS}
    source = ASTSource(kernel, signature, constexprs={"HAS_BIAS": True, "SPLIT_K": split_k, **constants},
                       attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, read from the cubin by the cuobjdump that Triton ships."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        tool = triton.knobs.nvidia.cuobjdump.path
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def resident_warps(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Warps of this kernel an SM holds at once (registers are allocated per warp in units of 256)."""
    registers_per_warp = -(-registers * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (registers_per_warp * num_warps)
    by_shared = ARCHITECTURES[arch][2] // (shared_bytes + 1024)  # the driver reserves 1 KiB per block
    return min(MAX_WARPS_PER_SM // num_warps, by_registers, by_shared) * num_warps


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma.sync" if "mma.sync" in ptx else "none"


def compile_config(config: TileConfig, arch: int, dtype: str = "bfloat16", split_k: int = 1) -> CompileReport:
    """Compile one configuration for `sm_{arch}` and check its cubin (see the module docstring)."""
    from sinkkernels.triton_sparse24 import _sparse24_kernel as kernel

    compiled = _compile(kernel, dtype, split_k, arch, {"DOT_FP32": False, **config.constexprs()},
                        config.num_warps, config.num_stages)
    registers, spill = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    report = CompileReport(arch, dtype, split_k, config, registers, spill, compiled.metadata.shared,
                           ARCHITECTURES[arch][1], _mma_kind(ptx), ptx.count("cp.async.cg.shared.global"),
                           resident_warps(arch, registers, compiled.metadata.shared, config.num_warps))
    if spill:
        report.problems.append(f"spills {spill} bytes per thread to local memory")
    if report.shared_bytes > report.shared_limit:
        report.problems.append(f"needs {report.shared_bytes} bytes of shared memory, sm_{arch} has "
                               f"{report.shared_limit}")
    if report.mma == "none":
        report.problems.append("the dot does not use tensor cores")
    if not report.async_copies:
        report.problems.append("no cp.async: the weight tiles are not streamed asynchronously")
    return report


@dataclass
class SmallMReport:
    """The small-M (CUDA-core) kernel at one M size class: what its cubin uses."""

    arch: int
    dtype: str
    split_k: int
    block_m: int
    block_n: int
    block_v: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    problems: list[str] = field(default_factory=list)


def compile_small_m(block_m: int, arch: int, dtype: str = "bfloat16", split_k: int = 1) -> SmallMReport:
    """The small-M kernel with the tiles `small_m_tiles` gives M = block_m: no spill, shared memory in budget."""
    from sinkkernels.triton_sparse24 import _sparse24_small_m_kernel as kernel
    from sinkkernels.triton_sparse24 import SmallMTiles, small_m_blocks

    block_n, block_v = small_m_blocks(block_m)
    launch = SmallMTiles(block_n, block_v, split_k)
    compiled = _compile(kernel, dtype, split_k, arch, {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_V": block_v},
                        launch.num_warps, launch.num_stages)
    registers, spill = _resource_usage(compiled.asm["cubin"])
    report = SmallMReport(arch, dtype, split_k, block_m, block_n, block_v, registers, spill,
                          compiled.metadata.shared)
    if spill:
        report.problems.append(f"spills {spill} bytes per thread to local memory")
    if report.shared_bytes > ARCHITECTURES[arch][1]:
        report.problems.append(f"needs {report.shared_bytes} bytes of shared memory")
    return report


def markdown(reports: list[CompileReport]) -> str:
    lines = ["| arch | dtype | split-K | BLOCK_M x N x K | warps | stages | registers | spill B | shared KiB | "
             "MMA | cp.async | warps/SM | problems |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in reports:
        c = r.config
        lines.append(f"| sm_{r.arch} | {r.dtype} | {r.split_k} | {c.block_m}x{c.block_n}x{c.block_k} | "
                     f"{c.num_warps} | {c.num_stages} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes / 1024:.0f} | {r.mma} | {r.async_copies} | {r.resident_warps} | "
                     f"{'; '.join(r.problems)} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHITECTURES), default=sorted(ARCHITECTURES),
                        help="compute capabilities to compile for (80: A100, 90: H100/H200)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument("--split-k", type=int, nargs="+", choices=SPLIT_KS, default=list(SPLIT_KS),
                        help="1: one program per output tile; 2: the split-K path (fp32 partial sums)")
    parser.add_argument("--config", type=TileConfig.parse, action="append",
                        help="check this configuration instead of the autotune list (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/kernels_compile_check.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every compilation is clean, 1 when any has a problem, 2 on bad usage."""
    args = _parse(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks.compile_check: unset TRITON_INTERPRET; it needs the compiled kernel, not the interpreter",
              file=sys.stderr)
        return 2
    from tqdm import tqdm

    configs = args.config or autotune_configs()
    jobs = [(c, arch, dtype, split) for arch in args.arch for dtype in args.dtype for split in args.split_k
            for c in configs]
    reports = [compile_config(c, arch, dtype, split)
               for c, arch, dtype, split in tqdm(jobs, desc="compiling", unit="kernel", file=sys.stderr)]
    small = [] if args.config else [compile_small_m(block_m, arch, dtype, split) for arch in args.arch
                                    for dtype in args.dtype for split in args.split_k for block_m in SMALL_M_SIZES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import triton
    args.out.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                    "reports": [asdict(r) for r in reports],
                                    "small_m_reports": [asdict(r) for r in small]}, indent=1) + "\n")
    print(markdown(reports))
    for r in small:
        print(f"small-M kernel sm_{r.arch} {r.dtype} split-K {r.split_k} BLOCK_M={r.block_m} "
              f"({r.block_n}x{r.block_v}): {r.registers} registers, {r.spill_bytes} B spill, "
              f"{r.shared_bytes} B shared {'; '.join(r.problems)}")
    failed = [r for r in reports + small if r.problems]
    total = len(reports) + len(small)
    print(f"\n{total - len(failed)}/{total} compilations clean; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
