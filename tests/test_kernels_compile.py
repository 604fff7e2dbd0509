"""The Triton 2:4 kernel compiled for A100 and H100 without a GPU: no spill, shared memory in budget, tensor cores.

Runs `python -m benchmarks.compile_check` in a subprocess: the interpreter tests set
TRITON_INTERPRET=1 in this process, and the compile check needs the real compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compile_check import ARCHITECTURES, SPLIT_KS

ROOT = Path(__file__).resolve().parents[1]


def compile_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--out", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    reports = json.loads(out.read_text())["reports"] if out.is_file() else []
    return result, reports


def test_every_autotune_config_compiles_clean_for_a100_and_h100(tmp_path):
    from sinkkernels.triton_sparse24 import GPU_CONFIGS

    result, reports = compile_check(tmp_path, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(reports) == len(GPU_CONFIGS) * len(ARCHITECTURES) * len(SPLIT_KS)
    for report in reports:
        config = report["config"]
        assert report["spill_bytes"] == 0 and report["shared_bytes"] <= report["shared_limit"], report
        assert report["async_copies"] > 0, report
        # Hopper's warp-group MMA needs 64 rows per tile; smaller tiles and Ampere use mma.sync.
        hopper_tile = report["arch"] == 90 and config["block_m"] >= 64
        assert report["mma"] == ("wgmma" if hopper_tile else "mma.sync"), report


def test_check_flags_a_config_that_spills(tmp_path):
    # 128x256x64 tiles on 4 warps need far more than 255 registers per thread on sm_80.
    result, reports = compile_check(tmp_path, "--arch", "80", "--dtype", "bfloat16", "--split-k", "1",
                                    "--config", "128,256,64,4,2")
    assert result.returncode == 1
    [report] = reports
    assert report["spill_bytes"] > 0 and any("spills" in problem for problem in report["problems"])
    assert "spills" in result.stdout


@pytest.mark.parametrize("argument", ["16,64", "16,64,x,8,4"])
def test_malformed_config_is_a_usage_error(tmp_path, argument):
    result, _ = compile_check(tmp_path, "--config", argument)
    assert result.returncode == 2 and "BLOCK_M,BLOCK_N,BLOCK_K,NUM_WARPS,NUM_STAGES" in result.stderr


def test_refuses_to_run_under_the_interpreter(tmp_path):
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr and not out.exists()


def test_small_m_kernel_compiles_without_spill_at_every_size_class(tmp_path):
    from benchmarks.compile_check import SMALL_M_SIZES

    result, _ = compile_check(tmp_path, "--dtype", "bfloat16", "--arch", "90", "--split-k", "1", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    small = json.loads((tmp_path / "compile.json").read_text())["small_m_reports"]
    assert sorted({r["block_m"] for r in small}) == list(SMALL_M_SIZES) and len(small) == 2 * len(SMALL_M_SIZES)
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 128 for r in small), small
