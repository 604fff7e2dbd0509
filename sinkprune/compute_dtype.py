"""Which dtype to calibrate in: the fastest one the device runs, measured.

A checkpoint's stored dtype says how its weights are kept, not how fast the
machine multiplies them. bf16 on a CPU without bf16 instructions is emulated:
on this project's AVX2 machine it ran at about 6% of the fp32 matmul rate,
while a CPU with AMX runs bf16 several times faster than fp32. CPU flags do not
settle it (a VM or `ONEDNN_MAX_CPU_ISA` can hide what the silicon has), so on
a CPU the two candidates are timed on a small matmul (a fraction of a second).
Calibration never runs below the stored precision, and the artifact is written
in the stored dtype either way. A CUDA GPU always calibrates in the stored dtype.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16", "float16")

HALF = (torch.bfloat16, torch.float16)


def matmul_rate(device: torch.device | str, dtype: torch.dtype, rows: int = 256, features: int = 1024,
                reps: int = 3) -> float:
    """Best-of-`reps` FLOP/s of a (rows x features) @ (features x features) product."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, features, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(features, features, generator=generator).to(device=device, dtype=dtype)
    a @ b  # first call: allocation and kernel selection
    best = float("inf")
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 2 * rows * features * features / best


def calibration_dtype(device: torch.device | str, stored: torch.dtype) -> torch.dtype:
    """The stored dtype, unless it is a half dtype that this CPU multiplies slower than float32."""
    if stored not in HALF or torch.device(device).type != "cpu":
        return stored
    return stored if matmul_rate(device, stored) >= matmul_rate(device, torch.float32) else torch.float32


def stored_and_calibration_dtype(model_dir: Path, device: torch.device | str, choice: str = "auto"):
    """(stored, calibration) dtypes of a model directory; `choice` is "auto" or a dtype name."""
    from sinkprune.dlm.loading import config_dtype, read_config

    stored = config_dtype(read_config(model_dir))
    return stored, calibration_dtype(device, stored) if choice == "auto" else getattr(torch, choice)
