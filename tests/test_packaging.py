"""Packaging facts the rest of the product relies on."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from packaging.version import Version


def test_transformers_does_not_mistake_our_kernels_for_hub_kernels():
    import sinkkernels
    import transformers.utils.import_utils as import_utils

    assert "sinkserve" in (kernels.__doc__ or "")
    assert import_utils.is_kernels_available() is False
    ours = Version(importlib.metadata.version("sinkserve"))
    assert not Version(import_utils.KERNELS_MIN_VERSION) <= ours < Version(import_utils.KERNELS_MAX_VERSION)


def test_transformers_hub_kernel_integration_imports_cleanly_beside_ours():
    # in a fresh interpreter: the integration module imports `kernels` eagerly if it believes it is HF's
    code = "import sinkkernels, transformers.integrations.hub_kernels as h; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_exits_2_with_a_message_on_bad_input(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--model", str(tmp_path / "missing"),
                          "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--prompt", "x", "--gen-length", "10",
                          "--block-length", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "multiple of block_length" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--prompt", "x", "--cache", "dual",
                          "--cfg-scale", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--cfg-scale" in out.stderr


def test_cli_generates_with_the_dual_cache():
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--prompt", "The file", "--steps", "8",
                          "--gen-length", "16", "--block-length", "8", "--cache", "dual"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The file") and "[8 forward passes" in out.stdout


def test_the_declared_transformers_floor_is_the_release_ci_tests():
    """`transformers>=X` in pyproject.toml: X is at most the release installed here (what CI tests), in
    its major; 4.x is out (its AutoTokenizer cannot read a tokenizer_config 5.x wrote)."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    requirement = next(r for r in project["dependencies"] if re.match(r"transformers\b", r))
    floor = Version(re.search(r">=\s*([\d.]+)", requirement).group(1))
    installed = Version(importlib.metadata.version("transformers"))
    assert floor >= Version("5.0")
    assert floor <= installed and floor.major == installed.major
