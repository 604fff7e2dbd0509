"""Layering: the product never imports the benchmarks (DESIGN.md), and serve/'s engine and decisions
import neither Ray nor FastAPI."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("sinkprune", "sinkkernels", "serve", "loadtest")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_product_module_imports_benchmarks():
    offenders = [str(path.relative_to(ROOT)) for package in PRODUCT for path in (ROOT / package).rglob("*.py")
                 if any(name == "benchmarks" or name.startswith("benchmarks.") for name in imported_modules(path))]
    assert offenders == []


def test_no_benchmark_script_is_left_in_a_product_package():
    leftovers = [str(path.relative_to(ROOT)) for package in PRODUCT for path in (ROOT / package).rglob("*.py")
                 if path.name.startswith("bench") or path.name == "compile_check.py"]
    assert leftovers == []


def _room_imports(room: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / "serve" / room).rglob("*.py")
            for name in sorted(imported_modules(path)) if name.split(".")[0] in banned]


def test_the_engine_imports_neither_ray_nor_fastapi():
    """serve/engine/ runs in-process (benchmarks, tests, one replica): Ray and HTTP live elsewhere."""
    assert _room_imports("engine", ("ray", "fastapi", "starlette")) == []


def test_the_decisions_import_neither_ray_nor_fastapi():
    """serve/decisions/ is a plain object the ingress calls: testable without Ray Serve or HTTP."""
    assert _room_imports("decisions", ("ray", "fastapi", "starlette")) == []
