"""Schemathesis against the live app (the shared `app` fixture): every check, bounded examples.

It fails on any 5xx, any status or header the OpenAPI document does not declare, any response
that breaks its documented schema (errors, SSE events included), any schema-violating request
accepted, and any schema-valid request refused for a reason the schema could have stated
(tests/fuzz/hooks.py allows only the documented cross-field rules)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_PER_OPERATION = 30


def test_schemathesis_finds_nothing(app, tmp_path):
    report = tmp_path / "schemathesis.json"
    command = [str(Path(sys.executable).with_name("st")), "--config-file", str(ROOT / "tests/fuzz/schemathesis.toml"),
               "run", app.base_url + "/openapi.json", "--checks", "all", "-n", str(EXAMPLES_PER_OPERATION),
               "--workers", "1", "--seed", "20261130", "--request-timeout", "120", "--no-color",
               "--report", "json", "--report-json-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    result = json.loads(report.read_text())
    operations = 6  # completions, chat, generate, models, healthz, rollout
    assert result["operations"]["tested"] == operations and result["test_cases"]["errored"] == 0
    assert result["test_cases"]["generated"] >= operations * EXAMPLES_PER_OPERATION
    assert result["test_cases"]["with_failures"] == 0 and not result["failures"] and not result["errors"]
