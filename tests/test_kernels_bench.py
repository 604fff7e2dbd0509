"""The benchmark: its CPU smoke run end to end, and how it turns measurements into a dispatch table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.bench_kernels import Row, bytes_moved, dispatch_plans, write_table
from sinkkernels.dispatch import TABLE_FORMAT

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_checks_dense_and_interpreter_paths(tmp_path):
    out, table = tmp_path / "smoke.json", tmp_path / "table.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", "--cpu-smoke", "--out", str(out),
                          "--table", str(table)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "NOT performance numbers" in run.stdout
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    timed = [r for r in report["rows"] if r["skipped"] is None]
    assert {r["backend"] for r in timed} == {"dense", "triton"} and len(timed) == len(report["rows"]) == 12
    assert all(r["max_rel_err"] < 1e-2 for r in timed)
    assert not table.exists()  # CPU timings never feed the dispatch table


def test_bytes_moved_counts_values_and_metadata():
    assert bytes_moved(1, 8, 16, "dense", 2) == (16 + 8) * 2 + 8 * 16 * 2
    assert bytes_moved(1, 8, 16, "triton", 2) == (16 + 8) * 2 + 8 * 8 * 2 + 8 * 16 // 8


def test_dispatch_plans_keep_the_fastest_backend_per_m_range(tmp_path):
    times = {1: {"dense": 3.0, "triton": 1.0, "cusparselt": 4.0}, 16: {"dense": 3.0, "triton": 2.0},
             256: {"dense": 3.0, "triton": 4.0, "cusparselt": 2.5}, 4096: {"dense": 9.0, "cusparselt": 5.0}}
    rows = [Row("m", 64, 32, m, backend, ms=ms) for m, by_backend in times.items()
            for backend, ms in by_backend.items()]
    rows.append(Row("m", 64, 32, 16, "cutlass", skipped="needs CUDA"))
    plans = dispatch_plans(rows, "GPU", torch.bfloat16)
    assert plans == {"GPU|bfloat16|64x32": [[16, "triton"], [None, "cusparselt"]]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": TABLE_FORMAT, "plans": {"Other|float16|8x8": [[None, "dense"]]}}))
    write_table(plans, path)
    assert json.loads(path.read_text())["plans"] == {"Other|float16|8x8": [[None, "dense"]], **plans}
