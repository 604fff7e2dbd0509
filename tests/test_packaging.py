"""Packaging facts the rest of the product relies on."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.version import Version


# Hugging Face's `kernels` distribution (a dependency of transformers) owns the import name `kernels`; our
# kernels room is the package `sinkkernels` (README, "Import names"). These tests hold that fact from the
# repository root (where our folders come first on sys.path), from an installed wheel, and for every
# top-level name we install.

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: HF's kernels and the transformers integration that imports it eagerly, then
# ours beside them. Prints where each came from.
_BOTH_SIDES = """
import importlib.metadata, json, sys
from pathlib import Path
import kernels
kernels.CUDAProperties
import transformers.integrations.hub_kernels
from transformers.utils.import_utils import is_kernels_available
import sinkkernels, sinkprune, serve, loadtest
hf = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
print(json.dumps({
    "sys_path_0": str(Path(sys.path[0] or ".").resolve()),
    "kernels": str(Path(kernels.__file__).resolve()),
    "hf_kernels": str(hf.resolve()),
    "kernels_available": is_kernels_available(),
    "ours": {m.__name__: str(Path(m.__file__).resolve()) for m in (sinkkernels, sinkprune, serve, loadtest)},
}))
"""


def _both_sides(cwd: Path, pythonpath: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    out = subprocess.run([sys.executable, "-c", _BOTH_SIDES], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _our_top_level_names() -> set[str]:
    """The top-level import names our distribution installs: pyproject's packages.find include, resolved."""
    import tomllib

    from setuptools import find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = tool["packages"]["find"]["include"]
    return {p.split(".")[0] for p in find_packages(where=str(ROOT), include=include)}


def _top_level_names_of(dist: importlib.metadata.Distribution) -> set[str]:
    """What a distribution puts at the top of the import namespace: its top_level.txt and its RECORD's files."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or []:
        first = f.parts[0] if f.parts else ""
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".data", ".egg-info")):
            continue
        if len(f.parts) > 1:
            names.add(first)
        elif first.endswith((".py", ".so", ".pyd")):
            names.add(first.split(".")[0])
    return {n for n in names if n.isidentifier()}


def test_hf_kernels_and_the_transformers_integration_import_from_the_repository_root():
    # in this process, under pytest's pythonpath = ["."]
    import kernels

    import sinkkernels

    hf = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert hasattr(kernels, "CUDAProperties")
    assert Path(kernels.__file__).resolve() == Path(hf).resolve()
    assert Path(sinkkernels.__file__).resolve().is_relative_to(ROOT)
    # in a fresh interpreter whose first sys.path entry is the repository root
    got = _both_sides(cwd=ROOT, pythonpath=ROOT)
    assert got["sys_path_0"] == str(ROOT)
    assert got["kernels"] == got["hf_kernels"]
    assert "site-packages" in Path(got["kernels"]).parts
    assert got["kernels_available"] is True
    for name, file in got["ours"].items():
        assert Path(file).is_relative_to(ROOT / name), (name, file)


def test_the_installed_wheel_writes_no_kernels_folder_and_hf_kernels_still_imports(tmp_path):
    # build from a copy, so the build's build/ and *.egg-info stay out of the working tree
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist",
                                                             "__pycache__", "*.egg-info", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("sinkserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        site = tmp_path / "site"
        zf.extractall(site)  # what a non-editable install puts in site-packages (console scripts aside)
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert "kernels" not in top and not any(n.startswith("kernels/") for n in names)
    assert top == _our_top_level_names() == {"sinkprune", "sinkkernels", "serve", "loadtest"}
    # every file the packages keep in git is installed (data files need pyproject's package-data)
    tracked = subprocess.run(["git", "ls-files", "-z", "--", *sorted(top)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    if tracked.returncode == 0:
        missing = {f for f in tracked.stdout.split("\0") if f and (ROOT / f).is_file()} - set(names)
        assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {sorted(missing)}"
    # from outside the repository, with the installed copy first on sys.path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _both_sides(cwd=elsewhere, pythonpath=site)
    assert got["kernels"] == got["hf_kernels"] and "site-packages" in Path(got["kernels"]).parts
    assert got["kernels_available"] is True
    for name, file in got["ours"].items():
        assert Path(file).is_relative_to(site.resolve() / name), (name, file)


def test_no_top_level_name_we_install_belongs_to_another_installed_distribution():
    ours = _our_top_level_names()
    assert ours == {"sinkprune", "sinkkernels", "serve", "loadtest"}  # benchmarks/ and tests/ are not installed
    assert not ours & set(sys.stdlib_module_names)
    taken: dict[str, list[str]] = {}
    scripts: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name is None or name.lower() == "sinkserve":
            continue
        for top in _top_level_names_of(dist) & ours:
            taken.setdefault(top, []).append(name)
        for ep in dist.entry_points.select(group="console_scripts"):
            scripts.setdefault(ep.name, []).append(name)
    assert taken == {}, f"our import names are also installed by: {taken}"
    assert "kernels" in _top_level_names_of(importlib.metadata.distribution("kernels"))  # the walk sees names
    import tomllib

    our_scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    assert not {s: scripts[s] for s in our_scripts if s in scripts}


def test_cli_exits_2_with_a_message_on_bad_input(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--model", str(tmp_path / "missing"),
                          "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sinkprune", "generate", "--prompt", "x", "--gen-length", "10",
                          "--block-length", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--gen-length 10 must be a multiple of --block-length 4" in out.stderr
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
