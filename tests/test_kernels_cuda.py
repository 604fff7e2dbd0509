"""Every backend against dense on a GPU (skipped without CUDA), and the benchmark's CUDA path."""
from __future__ import annotations

import json

import pytest
import torch

from sinkkernels import dispatch
from benchmarks.bench_kernels import main as bench_main
from sinkkernels.sparse24 import Sparse24Linear
from sinkkernels.testing import random_24_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["dense", "triton", "cusparselt", "cutlass"]


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)


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


def test_semi_structured_weight_is_converted_once(monkeypatch):
    available("cusparselt", torch.float16, 128, 256)
    calls = []
    convert = torch.sparse.to_sparse_semi_structured
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: calls.append(1) or convert(w))
    layer = Sparse24Linear.from_dense(random_24_weight(128, 256, torch.float16, "cuda"), backend="cusparselt")
    for m in (1, 9, 300):
        layer(torch.randn(m, 256, device="cuda", dtype=torch.float16))
    assert len(calls) == 1


def test_default_plan_on_cuda():
    plan = dispatch.plan_for("cuda", torch.bfloat16, 4096, 4096, table={})
    assert plan.backend_for(1) == "triton"
    large = "cusparselt" if torch.backends.cusparselt.is_available() else "dense"
    assert plan.backend_for(4096) == large
    assert dispatch.plan_for("cuda", torch.float32, 4096, 4096, table={}).backends == ("dense",)


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
