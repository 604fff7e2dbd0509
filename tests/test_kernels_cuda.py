"""Every backend against dense on a GPU (skipped without CUDA), and the benchmark's CUDA path."""
from __future__ import annotations

import json

import pytest
import torch

from sinkkernels import dispatch
from benchmarks.bench_kernels import main as bench_main
from sinkkernels.sparse24 import Sparse24Linear
from sinkkernels.testing import random_24_weight

ENV_AUTOTUNE = "SINKSERVE_TRITON_AUTOTUNE"  # sinkkernels.triton_sparse24's; importing it here would load triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["dense", "triton", "cusparselt", "cutlass"]


@pytest.fixture(autouse=True)
def no_forced_backend_and_fixed_tiles(monkeypatch):
    """Fixed Triton tiles keep the file under a minute on a GPU; test_autotuned_triton_matches_dense tunes."""
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.setenv(ENV_AUTOTUNE, "0")


def test_autotuned_triton_matches_dense(monkeypatch):
    from sinkkernels import triton_sparse24

    assert triton_sparse24.ENV_AUTOTUNE == ENV_AUTOTUNE
    available("triton", torch.bfloat16, 512, 1024)
    monkeypatch.delenv(ENV_AUTOTUNE)
    weight = random_24_weight(512, 1024, torch.bfloat16, "cuda", seed=5)
    x = torch.randn(48, 1024, device="cuda", dtype=torch.bfloat16)
    y = Sparse24Linear.from_dense(weight, backend="triton")(x)
    torch.testing.assert_close(y.float(), x.float() @ weight.float().T, atol=3e-2, rtol=2e-2)


def available(backend: str, dtype: torch.dtype, n: int, k: int) -> None:
    reason = dispatch.unavailable_reason(backend, torch.device("cuda"), dtype, n, k)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, k", [(128, 256), (512, 4096)])  # (512, 4096) at M = 1 takes Triton's split-K path
@pytest.mark.parametrize("m", [1, 7, 64, 200])
def test_backend_equals_dense_reference(backend, dtype, n, k, m):
    available(backend, dtype, n, k)
    weight = random_24_weight(n, k, dtype, "cuda", seed=m)
    bias = torch.randn(n, device="cuda").to(dtype)
    x = torch.randn(3, m, k, device="cuda").to(dtype)
    layer = Sparse24Linear.from_dense(weight, bias, backend=backend)
    expected = x.float() @ weight.float().T + bias.float()
    y = layer(x)
    assert y.shape == (3, m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=2e-2)


def test_cusparselt_plans_are_made_once_per_shape_and_padded_m():
    available("cusparselt", torch.float16, 144, 320)
    from sinkkernels import cusparselt

    weight = random_24_weight(144, 320, torch.float16, "cuda")  # a shape no other test uses
    layers = [Sparse24Linear.from_dense(weight, backend="cusparselt") for _ in range(2)]
    before = len(cusparselt._PLANS)
    for layer in layers:
        for m in (1, 9, 300):  # 1 and 9 share the plan for 16 rows, 300 runs on 304
            layer(torch.randn(m, 320, device="cuda", dtype=torch.float16))
    assert len(cusparselt._PLANS) - before == 2


@pytest.mark.parametrize("backend", ["dense", "triton", "cusparselt"])
def test_backend_replays_in_a_cuda_graph(backend):
    """What the engine's graphs rely on: a captured call reads new inputs written into the same buffer."""
    available(backend, torch.bfloat16, 512, 1024)
    weight = random_24_weight(512, 1024, torch.bfloat16, "cuda", seed=3)
    layer = Sparse24Linear.from_dense(weight, backend=backend)
    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    layer(x)  # warm-up: autotuning and plans happen outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y.float(), x.float() @ weight.float().T, atol=3e-2, rtol=2e-2)


def test_bench_writes_measurements_and_dispatch_table(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "table.json"
    assert bench_main(["--models", "dream-7b", "--m", "1", "256", "--warmup", "1", "--reps", "3",
                       "--out", str(out), "--table", str(table)]) == 0
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if r["skipped"] is None]
    assert {r["backend"] for r in timed} >= {"dense", "triton"}
    assert all(r["max_rel_err"] < 2e-2 and r["ms"] > 0 for r in timed)
    plans = json.loads(table.read_text())["plans"]
    assert len(plans) == 4 and all(steps[-1][0] is None for steps in plans.values())
