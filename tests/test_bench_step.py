"""`python -m benchmarks.bench_step` on CPU: the swap-and-restore, the logits check, the report and bad arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkkernels.sparse24 import Sparse24Linear
from benchmarks.bench_step import BASELINE, build, fused, prune_24, split_label, swapped
from sinkprune.calibration import prunable_linears

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path: Path, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--out", str(tmp_path / "step.json"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_swap_is_undone_and_sparse_logits_equal_the_pruned_dense_ones():
    model = build("embedded", layers=2, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    names = prune_24(model)
    assert len(names) == 2 * 7  # q, k, v, out, gate, up, down per block
    originals = {name: model.get_submodule(name) for name in names}
    ids = torch.randint(0, 100, (2, 12))
    with torch.inference_mode():
        dense = model(ids).logits
        with swapped(model, "dense"):
            assert all(isinstance(model.get_submodule(n), Sparse24Linear) for n in names)
            torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)
        assert all(model.get_submodule(n) is originals[n] for n in names)
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def test_fusing_is_undone_and_a_fused_swap_stacks_the_packed_rows():
    model = build("embedded", layers=2, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    names = prune_24(model)
    originals = {name: model.get_submodule(name) for name in names}
    ids = torch.randint(0, 100, (2, 12))
    with torch.inference_mode():
        dense = model(ids).logits
        with fused(model), swapped(model, "dense"):
            block = model.blocks[0]
            assert not hasattr(block, "q_proj") and isinstance(block.qkv_proj.linear, Sparse24Linear)
            assert block.qkv_proj.linear.out_features == sum(originals[f"model.transformer.blocks.0.{n}"].out_features
                                                             for n in ("q_proj", "k_proj", "v_proj"))
            torch.testing.assert_close(model(ids).logits, dense, rtol=1e-6, atol=1e-6)
        assert all(model.get_submodule(n) is originals[n] for n in names)
        assert model.blocks[0].qkv_proj is None and model.blocks[0].gate_up_proj is None
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def test_backend_labels():
    assert split_label("triton") == ("triton", frozenset())
    assert split_label("fused") == (None, {"fused"})
    assert split_label("auto+fused") == ("auto", {"fused"})
    assert split_label("fused+compiled") == (None, {"fused", "compiled"})
    assert split_label("auto+fused+compiled") == ("auto", {"fused", "compiled"})
    for bad in ("auto+fast", "fused+fused", "tritium+fused"):
        with pytest.raises(ValueError, match="modifiers|unknown backend"):
            split_label(bad)


def test_preset_keeps_the_public_shapes_with_fewer_layers():
    model = build("llada-8b", layers=1, device=torch.device("meta"), dtype=torch.bfloat16, seed=0)
    assert len(model.blocks) == 1
    shapes = {tuple(linear.weight.shape) for linear in prunable_linears(model).values()}
    assert sorted(shapes) == [(4096, 4096), (4096, 12288), (12288, 4096)]


@pytest.mark.slow
def test_cpu_run_reports_every_backend(tmp_path):
    result = bench(tmp_path, "--device", "cpu", "--layers", "1", "--batch", "1", "--seq", "12", "--block", "4",
                   "--warmup", "1", "--reps", "1", "--backends", "dense,triton,cusparselt,auto,fused,triton+fused,"
                   "fused+compiled",
                   interpret=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "step.json").read_text())
    assert (tmp_path / "step.png").stat().st_size > 0
    assert report["sparse_layers"] == 7 and report["layers"] == 1
    backends = [BASELINE, "dense", "triton", "cusparselt", "auto", "fused", "triton+fused", "fused+compiled"]
    assert [(r["backend"], r["block"]) for r in report["rows"]] == [(b, k) for b in backends for k in (None, 4)]
    checks = {c["backend"]: c for c in report["checks"]}
    assert checks["dense"]["max_rel_err"] == 0 and checks["auto"]["max_rel_err"] == 0
    assert checks["fused"]["max_rel_err"] < 1e-6
    assert 0 < checks["triton"]["max_rel_err"] < 1e-4  # fp32 through our kernel, a different summation order
    assert 0 < checks["triton+fused"]["max_rel_err"] < 1e-4
    launches = {(r["backend"], r["block"]): r["launches"] for r in report["rows"]}
    for block in (None, 4):  # fused: 3 linears fewer per block (q/k/v -> 1, gate/up -> 1)
        assert launches[("fused", block)] == launches[(BASELINE, block)] - 3
        assert launches[("fused+compiled", block)] < launches[("fused", block)]  # one per elementwise chain
    assert checks["fused+compiled"]["max_rel_err"] < 1e-5  # float32: the norm's sum in another order
    assert "CUDA" in checks["cusparselt"]["skipped"]
    assert all(r["ms"] > 0 for r in report["rows"] if r["skipped"] is None)
    assert "| triton | full | 1 | 12 | 12 |" in result.stdout and "| triton | dual cache, block 4 | 1 | 12 | 4 |" \
        in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--backends", "dense,fast"], "unknown backend fast"),
    (["--backends", "fused+fast"], "modifiers are +fused and +compiled"),
    (["--batch", "0"], "at least 1"),
    (["--seq", "8,x"], "comma-separated positive integers"),
    (["--layers", "0"], "--layers must be at least 1"),
    (["--block", "-1"], "--block must be 0"),
])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, args, message):
    result = bench(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "step.json").exists()
