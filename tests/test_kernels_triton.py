"""Our Triton 2:4 kernel against the dense reference; on CPU through the Triton interpreter.

bf16 `tl.dot` is wrong in the interpreter, so there the kernel casts bf16 tiles to
fp32 before the dot (loads, metadata decoding, masks and the bf16 output still run);
on a GPU the same tests run the native bf16 dot.
"""
from __future__ import annotations


import pytest
import torch

from sinkkernels import formats
from sinkkernels.sparse24 import Sparse24Linear
from sinkkernels.testing import random_24_weight
from sinkkernels.triton_sparse24 import GPU_CONFIGS, Tiles, sparse24_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-5}


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


def case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    weight = random_24_weight(n, k, dtype, DEVICE, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator).to(dtype=dtype, device=DEVICE)
    b = torch.randn(n, generator=generator).to(dtype=dtype, device=DEVICE) if bias else None
    return x, weight, b


def assert_matches(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    expected = reference(x, weight, bias)
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert expected.abs().max() > 0.5  # the comparison below is not vacuous
    torch.testing.assert_close(y.double(), expected, atol=TOLERANCE[x.dtype], rtol=TOLERANCE[x.dtype])


SHAPES = [  # (M, N, K); the interpreter's tiles are 32 x 64 x 64
    (1, 64, 64),      # M = 1
    (33, 40, 72),     # M, N and K all ragged against the tiles
    (5, 1, 4),        # minimum N and K (one group of 4)
    (16, 8, 12),      # odd number of groups: the last metadata byte is half used
    (70, 130, 136),   # several tiles along every dimension
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_kernel_equals_dense_reference(m, n, k, dtype):
    x, weight, bias = case(m, n, k, dtype, bias=(m % 2 == 1), seed=m + n + k)
    values, meta = formats.pack(weight)
    assert_matches(sparse24_matmul(x, values, meta, bias), x, weight, bias)


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_sums_the_partials_once(split_k, bias):
    x, weight, b = case(7, 48, 192, torch.float16, bias)
    values, meta = formats.pack(weight)
    assert_matches(sparse24_matmul(x, values, meta, b, tiles=Tiles(16, 32, 64, split_k)), x, weight, b)


@pytest.mark.parametrize("block_m, block_n, block_k", sorted({c[:3] for c in GPU_CONFIGS}))
def test_every_gpu_tile_shape_computes_the_product(block_m, block_n, block_k):
    """The autotuner may pick any of these tiles on a GPU; each must be right on ragged M, N and K, split or not."""
    x, weight, bias = case(37, 150, 520, torch.float16, bias=True, seed=block_m + block_n + block_k)
    values, meta = formats.pack(weight)
    for split_k in (1, 2):
        y = sparse24_matmul(x, values, meta, bias, tiles=Tiles(block_m, block_n, block_k, split_k))
        assert_matches(y, x, weight, bias)


def test_kernel_refuses_inconsistent_inputs():
    x, weight, bias = case(4, 16, 32, torch.float16, bias=True)
    values, meta = formats.pack(weight)
    with pytest.raises(ValueError, match="32 columns"):
        sparse24_matmul(x[:, :16], values, meta)
    with pytest.raises(ValueError, match="share one dtype"):
        sparse24_matmul(x.float(), values, meta)
    with pytest.raises(ValueError, match="share one dtype"):
        sparse24_matmul(x.double(), values.double(), meta)
    with pytest.raises(ValueError, match="meta must be uint8"):
        sparse24_matmul(x, values, meta.to(torch.int16))
    with pytest.raises(ValueError, match="bias must be"):
        sparse24_matmul(x, values, meta, bias[:8])


def test_sparse24_linear_triton_backend_equals_dense_backend():
    weight = random_24_weight(40, 72, torch.float16, DEVICE, seed=9)
    bias = torch.randn(40).to(dtype=torch.float16, device=DEVICE)
    x = torch.randn(2, 3, 72).to(dtype=torch.float16, device=DEVICE)
    triton_layer = Sparse24Linear.from_dense(weight, bias, backend="triton")
    assert triton_layer.plan.backends == ("triton",)
    assert_matches(triton_layer(x).reshape(6, 40), x.reshape(6, 72), weight, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_small_m_kernel_equals_the_dense_product(dtype, m, split_k):
    """The CUDA-core kernel for M <= 16 (no dense tile): odd M, K split unevenly, bias, N not a multiple of
    its block."""
    from sinkkernels.triton_sparse24 import SmallMTiles

    weight = random_24_weight(40, 96, dtype, DEVICE, seed=m)
    bias = torch.randn(40, device=DEVICE).to(dtype)
    x = torch.randn(m, 96, device=DEVICE).to(dtype)
    values, meta = formats.pack(weight)
    y = sparse24_matmul(x, values, meta, bias, tiles=SmallMTiles(block_n=16, block_v=16, split_k=split_k))
    assert y.shape == (m, 40) and y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(x, weight, bias), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_default_path_sends_small_m_to_the_cuda_core_kernel(monkeypatch):
    from sinkkernels import triton_sparse24

    calls = []
    real = triton_sparse24._sparse24_small_m
    monkeypatch.setattr(triton_sparse24, "_sparse24_small_m", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    weight = random_24_weight(32, 64, torch.float32, DEVICE)
    values, meta = formats.pack(weight)
    for m in (1, 16, 17):
        x = torch.randn(m, 64, device=DEVICE)
        torch.testing.assert_close(sparse24_matmul(x, values, meta).double(), reference(x, weight, None),
                                   rtol=1e-5, atol=1e-5)
    assert calls == [1, 16]
