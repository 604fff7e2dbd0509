"""Our Triton 2:4 GEMM: `y = x @ W^T (+ bias)` reading W packed (values + 4-bit metadata per group).

Triton has no sparse tensor-core dot, so each program expands its compressed tile of
W into a dense (BLOCK_K, BLOCK_N) tile in registers and calls a dense `tl.dot`
(fp32 accumulation). The win is the bytes not read from memory (9/16 of dense for
fp16/bf16), which is what bounds small-M (decode-like) products; at large M the
product is compute-bound and the semi-structured (cuSPARSELt) backend is faster.

Small M gives few output tiles, too few to fill the GPU, so K can be split over
`split_k` programs that each write an fp32 partial sum; the partials are then
summed in a fixed order (deterministic, no atomics).

Under `TRITON_INTERPRET=1` (CPU tests) there is no autotuning, one configuration
with large tiles keeps the interpreter fast, and bf16 tiles are cast to fp32 before
`tl.dot` because the interpreter's bf16 dot is wrong; everything else (loads,
metadata decoding, masks, the bf16 output) runs as on the GPU. fp32 inputs are
supported for tests and use an IEEE fp32 dot.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .formats import packed_shape

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration; fixes the tiles instead of autotuning (interpreter and tests)."""

    block_m: int = 32
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER_TILES = Tiles()
ENV_AUTOTUNE = "SINKSERVE_TRITON_AUTOTUNE"  # "0": fixed tiles by M (no tuning pass per new shape; the CUDA tests)


@triton.jit
def _sparse24_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_vn, stride_meta_n, stride_ys, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # M_BUCKET only keys the autotuner (power of two of M), so tiles are tuned per size class of M.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lanes = tl.arange(0, 4)[None, None, :]
    for k0 in range(k_begin, tl.minimum(k_begin + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        # Contiguous, vectorisable loads of the compressed tile: (BLOCK_N, BLOCK_K/2) values and one metadata
        # nibble per group of 4 (k0 is a multiple of BLOCK_K, itself a multiple of 8).
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offs_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        values = tl.load(values_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
                         mask=n_ok[:, None] & (offs_v < K // 2)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(values, (BLOCK_N, BLOCK_K // 4, 2)))
        byte = tl.load(meta_ptr + offs_n[:, None] * stride_meta_n + (offs_g // 2)[None, :],
                       mask=n_ok[:, None] & (offs_g < K // 4)[None, :], other=0)
        nibble = (byte.to(tl.int32) >> ((offs_g % 2) * 4)[None, :]) & 15
        # Expand in registers: lane j of group g is v0 where the first kept column is j, v1 where the second is.
        w = tl.where((nibble & 3)[:, :, None] == lanes, v0[:, :, None],
                     tl.where((nibble >> 2)[:, :, None] == lanes, v1[:, :, None], tl.zeros_like(v1)[:, :, None]))
        w = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out = offs_m[:, None] * stride_ym + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(y_ptr + pid_k * stride_ys + out, acc, mask=out_ok)


@triton.jit
def _sparse24_small_m_kernel(
    xt_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_vn, stride_meta_n, stride_ys,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Small M on CUDA cores: each kept value multiplies the row of x^T (BLOCK_M wide, padded) that its
    # metadata names, so the weight is read once, compressed, and never expanded to a dense tile. BLOCK_V
    # counts kept values (half of K); SPLIT_K programs split them and write fp32 partial sums.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    kept = K // 2
    span = tl.cdiv(kept, SPLIT_K * BLOCK_V) * BLOCK_V
    begin = pid_k * span
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for v0 in range(begin, tl.minimum(begin + span, kept), BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = n_ok[:, None] & (offs_v < kept)[None, :]
        values = tl.load(values_ptr + offs_n[:, None] * stride_vn + offs_v[None, :], mask=ok, other=0.0)
        group = offs_v // 2
        byte = tl.load(meta_ptr + offs_n[:, None] * stride_meta_n + (group // 2)[None, :], mask=ok, other=0)
        nibble = (byte.to(tl.int32) >> ((group % 2) * 4)[None, :]) & 15
        column = tl.where((offs_v % 2 == 0)[None, :], nibble & 3, nibble >> 2) + (group * 4)[None, :]
        xs = tl.load(xt_ptr + column[:, :, None] * BLOCK_M + offs_m[None, None, :],
                     mask=ok[:, :, None] & m_ok[None, None, :], other=0.0)
        acc += tl.sum(values.to(tl.float32)[:, :, None] * xs.to(tl.float32), axis=1)
    out = offs_m[None, :] * N + offs_n[:, None]
    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(y_ptr + pid_k * stride_ys + out, acc, mask=out_ok)


CUDA_CORE_M = 16  # at most this many rows go to the small-M kernel


@dataclass(frozen=True)
class SmallMTiles:
    """One launch configuration of the small-M kernel (BLOCK_M is M rounded up to a power of two)."""

    block_n: int = 32
    block_v: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# the interpreter pays per program and loop step, not per element: few, large blocks (the GPU's own blocks are
# checked by the compile check and the CUDA tests; explicit tiles still test small ones here)
INTERPRETER_SMALL_M_TILES = SmallMTiles(block_n=128, block_v=128)


def small_m_blocks(block_m: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V) for BLOCK_M rows: about 2K products per program and step, which compile for sm_90
    with no spill and under 80 registers (`python -m benchmarks.compile_check`)."""
    return (32, 64) if block_m <= 1 else (16, 32) if block_m <= 4 else (16, 16) if block_m <= 8 else (8, 16)


def small_m_tiles(m: int, n: int, k: int, device: torch.device) -> SmallMTiles:
    """The blocks for M's size class; K split until the programs fill the multiprocessors a few times."""
    if INTERPRET:
        return INTERPRETER_SMALL_M_TILES
    block_n, block_v = small_m_blocks(triton.next_power_of_2(m))
    programs = triton.cdiv(n, block_n)
    split_k = max(1, min(8, 4 * _sm_count(device) // programs, k // 2 // (4 * block_v)))
    return SmallMTiles(block_n, block_v, split_k)


def _sparse24_small_m(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                      tiles: SmallMTiles) -> torch.Tensor:
    m, k = x.shape
    n = values.shape[0]
    block_m = triton.next_power_of_2(m)
    xt = torch.zeros((k, block_m), dtype=x.dtype, device=x.device)
    xt[:, :m] = x.t()
    split_k = tiles.split_k
    y = torch.empty((m, n) if split_k == 1 else (split_k, m, n), dtype=x.dtype if split_k == 1 else torch.float32,
                    device=x.device)
    grid = (triton.cdiv(n, tiles.block_n), split_k)
    _sparse24_small_m_kernel[grid](xt, values, meta, bias if bias is not None else y, y, m, n, k,
                                   values.stride(0), meta.stride(0), y.stride(0) if split_k > 1 else 0,
                                   HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=block_m,
                                   BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, num_warps=tiles.num_warps,
                                   num_stages=tiles.num_stages)
    return y if split_k == 1 else _sum_partials(y, bias, x.dtype)


def _sum_partials(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The split-K partial sums (fp32) added in a fixed order (deterministic), then the bias."""
    total = partials.sum(0)
    if bias is not None:
        total += bias.float()
    return total.to(dtype)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small-M tiles (memory-bound: wide K steps, narrow N for
# more programs) and large-M tiles (compute-bound). Each compiles for sm_80 and sm_90 with no register spill and
# within shared memory: `python -m benchmarks.compile_check` checks them without a GPU (tests/test_kernels_compile.py).
GPU_CONFIGS = (
    (16, 32, 128, 4, 4), (16, 64, 64, 8, 4), (16, 64, 128, 8, 4), (16, 32, 256, 8, 3), (16, 128, 64, 8, 3),
    (32, 64, 64, 4, 4), (32, 64, 128, 8, 3), (32, 128, 64, 8, 3),
    (64, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
)


def _gpu_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in GPU_CONFIGS]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    small_m = named_args["M_BUCKET"] <= 32
    return [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == small_m]


_autotuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "SPLIT_K"],
                             prune_configs_by={"early_config_prune": _prune_configs})(_sparse24_kernel)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K when the output tiles of a small-M product cannot fill the streaming multiprocessors."""
    if _m_bucket(m) > 32:
        return 1
    return max(1, min(8, _sm_count(device) // triton.cdiv(n, 64), k // 512))


def fixed_tiles(m: int, n: int, k: int, device: torch.device) -> Tiles:
    """Tiles from GPU_CONFIGS by size class of M, with the default split-K: no autotuning pass."""
    block_m, block_n, block_k, warps, stages = (GPU_CONFIGS[2] if m <= 16 else GPU_CONFIGS[6] if m <= 32
                                                else GPU_CONFIGS[8] if m <= 64 else GPU_CONFIGS[9])
    return Tiles(block_m, block_n, block_k, _default_split_k(m, n, k, device), warps, stages)


def _check_inputs(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Cheap per-call checks; the metadata itself is validated once, when the weight is packed or loaded."""
    n, k = packed_shape(values)
    if meta.dtype != torch.uint8 or meta.shape != (n, triton.cdiv(k, 8)):
        raise ValueError(f"meta must be uint8 {(n, triton.cdiv(k, 8))}, got {meta.dtype} {tuple(meta.shape)}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be 2-D with {k} columns (the weight's in_features), got {tuple(x.shape)}")
    if x.dtype not in DTYPES or values.dtype != x.dtype:
        raise ValueError(f"x and values must share one dtype among {DTYPES}, got {x.dtype} and {values.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({n},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, values, meta, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, values, meta and bias must be on one device, got {sorted(map(str, devices))}")


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    tiles: Tiles | SmallMTiles | None = None) -> torch.Tensor:
    """`x (M, K) @ W^T + bias` for W `(N, K)` packed as (values, meta) by `sinkkernels.formats.pack`.

    `tiles=None`: M <= CUDA_CORE_M runs the small-M kernel (CUDA cores, no dense tile);
    larger M the tensor-core kernel, autotuned on GPU (with split-K for small M) or with
    `INTERPRETER_TILES` in the interpreter. `Tiles` forces the tensor-core kernel and its
    configuration, `SmallMTiles` the small-M kernel and its.
    """
    _check_inputs(x, values, meta, bias)
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    m, k = x.shape
    n = values.shape[0]
    if isinstance(tiles, SmallMTiles) or (tiles is None and m <= CUDA_CORE_M):
        return _sparse24_small_m(x, values, meta, bias, tiles or small_m_tiles(m, n, k, x.device))
    if tiles is None and INTERPRET:
        tiles = INTERPRETER_TILES
    elif tiles is None and os.environ.get(ENV_AUTOTUNE) == "0":
        tiles = fixed_tiles(m, n, k, x.device)
    split_k = tiles.split_k if tiles is not None else _default_split_k(m, n, k, x.device)
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    dot_fp32 = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    args = (x, values, meta, bias if bias is not None else y, y, m, n, k, _m_bucket(m),
            x.stride(0), values.stride(0), meta.stride(0), y.stride(0) if split_k > 1 else 0, n)
    flags = {"HAS_BIAS": bias is not None, "SPLIT_K": split_k, "DOT_FP32": dot_fp32}
    if tiles is None:
        def tuned_grid(config: dict) -> tuple[int, int, int]:
            return triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), split_k
        _autotuned[tuned_grid](*args, **flags)
    else:
        grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), split_k)
        _sparse24_kernel[grid](*args, **flags, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                               BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y if split_k == 1 else _sum_partials(y, bias, x.dtype)
