"""Command lines that cannot hurt (issue #25): the data-loss reproduction (`--out-dir "" --overwrite`
replaced the working directory) and its variants, and a property-based sweep of every entry point.

The sweep draws bad arguments (out-of-range, NaN/inf, non-numbers, empty paths) for every numeric and
path argument the parsers declare, and malformed files of any shape (sinkprune.json, config.json, router
config, load-test summary), then asserts for each invocation: exit 2, exactly one line on stderr naming
the argument or file, no traceback, nothing written anywhere but the test's own scratch files, and
no run longer than a few seconds (a hard alarm stops one that tries). Deterministic (derandomized), so
CI sees the same examples every run; `INVOCATIONS` counts them (printed at the end of the module).
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinkprune.cli_args import Range

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 5.0  # "a few seconds": the hard alarm per in-process invocation
INVOCATIONS: Counter = Counter()
OUTCOMES: Counter = Counter()  # of the sweeps where a valid input may be drawn: how many were
SWEEP = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.filter_too_much])
# Repository directories a command writes by default (ship, build-corpus, train-tokenizer, render):
# the sweep must leave them as they are.
GUARDED = [ROOT / "sinkprune" / "embedded" / "model", ROOT / "sinkprune" / "data" / "tokenizer",
           ROOT / "sinkprune" / "data" / "corpus", ROOT / "deploy" / "kuberay"]


# ---- the sandbox and the invocations ------------------------------------------------------------

@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """cwd/ with a user's notes.txt and work/ (the reproduction's directory) and a symlink to itself;
    home/ (HOME during the sweep); a tiny model (max 64 tokens) and a 2:4 artifact of it; a finished
    training run; a load-test run; scratch/ for the malformed files each example writes."""
    import torch

    from sinkprune.artifact import write_artifact
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm import DLMConfig, build_model
    from sinkprune.dlm.loading import load_tokenizer, save_model
    from sinkprune.prune import PruneSettings, prune_model
    from tests.conftest import tiny_hf_config

    root = tmp_path_factory.mktemp("sweep")
    cwd, home, scratch = root / "cwd", root / "home", root / "scratch"
    (cwd / "work").mkdir(parents=True)
    (cwd / "notes.txt").write_text("precious\n")
    (cwd / "work" / "draft.txt").write_text("also precious\n")
    (cwd / "here").symlink_to(cwd)
    home.mkdir()
    (home / ".profile").write_text("# the user's\n")
    scratch.mkdir()
    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id, "bos_token_id": 0,
                                    "max_sequence_length": 64}
    model = build_model(DLMConfig.from_hf_config(hf))
    save_model(model, root / "dense", tokenizer=tokenizer)
    prune_model(model, PruneSettings("magnitude", "2:4", [0.5]), torch.randint(3, 90, (2, 8)))
    write_artifact(model, root / "artifact", tokenizer, {"pattern": "2:4"})
    (root / "run" / "final").mkdir(parents=True)
    (root / "run" / "final" / "config.json").write_text("{}")
    (root / "load").mkdir()
    (root / "load" / "summary.json").write_text(json.dumps(_summary()))
    (root / "prompts.txt").write_text("the file\n")
    import matplotlib.pyplot  # noqa: F401 - imported once here, not inside a timed invocation
    return SimpleNamespace(root=root, cwd=cwd, home=home, scratch=scratch, dense=root / "dense",
                           artifact=root / "artifact", run=root / "run", load=root / "load",
                           prompts=root / "prompts.txt", config=json.loads((root / "dense" / "config.json").read_text()))


def _summary() -> dict:
    stats = {"completed": 4, "failed": 0, "request_throughput": 2.0, "output_throughput": 64.0, "p50_e2el_ms": 400.0}
    return {"phases": [{"phase": "c1", "concurrency": 1, "summary": {"all": stats, "dense": stats}}]}


@pytest.fixture
def in_box(box, monkeypatch):
    """Run from cwd/ with HOME=home/ (so `~` stays in the sandbox); serve.local starts nothing."""
    from serve import local

    monkeypatch.chdir(box.cwd)
    monkeypatch.setenv("HOME", str(box.home))
    monkeypatch.setattr(local, "local_app", _started)
    # serve.local's own SIGTERM handler stays out of this process (only its module's name is replaced)
    monkeypatch.setattr(local, "signal", SimpleNamespace(signal=lambda *a, **k: None, SIGTERM=signal.SIGTERM,
                                                           SIGKILL=signal.SIGKILL))
    return box


class Started(Exception):
    """serve.local got past every check (a valid configuration): it would start serving now."""


def _started(*args, **kwargs):
    raise Started


def _render_main():
    spec = importlib.util.spec_from_file_location("deploy_render_sweep", ROOT / "deploy" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render.main


def _serve_local(argv: list[str]):
    from serve import local

    saved, sys.argv = sys.argv, ["serve.local", *argv]
    try:
        return local.main()
    finally:
        sys.argv = saved


ENTRIES = {
    "sinkprune": lambda argv: __import__("sinkprune.cli", fromlist=["main"]).main(argv),
    "loadtest": lambda argv: __import__("loadtest.cli", fromlist=["main"]).main(argv),
    "report": lambda argv: __import__("loadtest.report", fromlist=["main"]).main(argv),
    "serve.local": _serve_local,
    "render": lambda argv: _render_main()(argv),
}


class TooLong(Exception):
    pass


def _alarm(signum, frame):
    raise TooLong(f"ran past {LIMIT_S} s")


def invoke(entry: str, argv: list[str]) -> tuple[int | str, str, float]:
    """(exit code or "started", stderr, seconds) of one in-process invocation; a traceback fails the test."""
    err, began = io.StringIO(), time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    INVOCATIONS[entry] += 1
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            try:
                code = ENTRIES[entry](argv)
            except SystemExit as stop:
                code = stop.code
            except Started:
                code = "started"
    except TooLong:
        pytest.fail(f"{entry} {argv}: still running after {LIMIT_S} s")
    except Exception:  # noqa: BLE001 - the very thing under test: no traceback
        pytest.fail(f"{entry} {argv} ended in a traceback:\n{traceback.format_exc()}\nstderr: {err.getvalue()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue(), time.monotonic() - began


def snapshot(box, skip: Path | None = None) -> dict[str, tuple]:
    """Every file and directory of the sandbox (but `skip`) and of the guarded repository directories."""
    seen = {}
    for top in [box.root, *GUARDED]:
        for dirpath, dirnames, filenames in os.walk(top):
            if skip is not None and Path(dirpath).is_relative_to(skip):
                continue
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if skip is not None and path.is_relative_to(skip):
                    continue
                stat = path.lstat()
                seen[str(path)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return seen


def assert_refused(box, entry: str, argv: list[str], names: tuple[str, ...] = (), scratch: bool = False) -> str:
    """Exit 2, one line `PROG: error: ...` naming one of `names`, nothing written; returns the line."""
    before = snapshot(box, box.scratch if scratch else None)
    code, err, seconds = invoke(entry, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{entry} {argv}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and ": error: " in lines[0], f"{entry} {argv}: {err!r}"
    assert "Traceback" not in err
    assert not names or any(name in lines[0] for name in names), f"{entry} {argv}: {lines[0]!r} names none of {names}"
    assert snapshot(box, box.scratch if scratch else None) == before, f"{entry} {argv} wrote something"
    assert seconds < LIMIT_S
    return lines[0]


# ---- the parsers: every numeric argument has a declared range, every path refuses "" ------------

def parsers() -> list[tuple[str, list[str], object]]:
    """(entry, argv prefix, parser) of every parser of every entry point (sinkprune: each command)."""
    from loadtest.cli import build_parser as loadtest_parser
    from loadtest.report import build_parser as report_parser
    from serve.local import build_parser as serve_parser
    from sinkprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict))
    return ([("sinkprune", [name], parser) for name, parser in sub.choices.items()]
            + [("loadtest", [], loadtest_parser()), ("report", [], report_parser()), ("serve.local", [], serve_parser())])


def arguments(kind) -> list[tuple[str, list[str], str, object]]:
    """(entry, prefix, flag, type) of every option whose type passes `kind`; a port's type is its Range."""
    from sinkprune.cli_args import integer, port_number

    return [(entry, prefix, action.option_strings[-1],
             integer(1, 65535) if action.type is port_number else action.type)
            for entry, prefix, parser in parsers() for action in parser._actions
            if action.option_strings and kind(action)]


PATH_DESTS = {"model", "pruned", "out_dir", "out", "text", "train", "tokenizer", "compare", "run", "prompts",
              "router_config", "metrics_before", "metrics_after", "pruned_artifact", "hidden_dir", "cache_dir",
              "heldout_dir"}


def _path_type(action) -> bool:
    from sinkprune import cli_args

    path_types = {cli_args.nonempty_path, cli_args.output_dir, cli_args.output_file, cli_args.existing_file,
                  cli_args.existing_dir, cli_args.as_path}
    return action.type in path_types


def test_every_numeric_argument_declares_a_range_and_every_path_refuses_the_empty_string():
    from sinkprune.cli_args import port_number

    raw = [(entry, prefix, action.option_strings) for entry, prefix, parser in parsers() for action in parser._actions
           if action.type in (int, float)]
    assert raw == [], f"numeric arguments without a declared range: {raw}"
    numeric = arguments(lambda a: isinstance(a.type, Range) or a.type is port_number)
    assert len(numeric) >= 60  # every command's counts, sizes, rates, seeds, ...
    unchecked = [(entry, prefix, action.option_strings) for entry, prefix, parser in parsers()
                 for action in parser._actions if action.dest in PATH_DESTS and not _path_type(action)
                 and (entry, action.dest) not in (("report", "run"), ("loadtest", "model"))]
    # report's --run is VARIANT=DIR; loadtest's --model is the requests' `model` field (its check: validate)
    assert unchecked == [], f"path arguments that accept the empty string: {unchecked}"


# Arguments every invocation of a command needs (so that only the drawn value is wrong).
def base_argv(box, entry: str, prefix: list[str]) -> list[str]:
    command = prefix[0] if prefix else None
    return prefix + {("sinkprune", "prune"): ["--model", str(box.dense), "--out-dir", "out"],
                     ("sinkprune", "adopt"): ["--model", str(box.dense), "--out-dir", "out"],
                     ("sinkprune", "eval"): ["--model", str(box.dense)],
                     ("sinkprune", "generate"): ["--prompt", "the file"],
                     ("report", None): ["--run", f"dense={box.load}"]}.get((entry, command), [])


def _rejected(kind: Range, text: str) -> bool:
    import argparse

    try:
        kind(text)
    except argparse.ArgumentTypeError:
        return True
    return False


JUNK = ["", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1.5", "2e3", "0x10", "ten", "1,000", "None",
        "--", "-x", "1 2"]


def bad_values(kind: Range) -> st.SearchStrategy[str]:
    """Text that `kind` must refuse: out of range on either side, NaN/inf where not allowed, not a number."""
    if kind.kind is int:
        sides = [st.integers(max_value=int(kind.lo) - 1), st.integers(min_value=int(kind.hi) + 1)]
        drawn = st.one_of(*sides).map(str)
    else:
        sides = [st.floats(max_value=kind.lo, exclude_max=not kind.lo_open, allow_nan=False)]
        if not (kind.allow_inf and kind.hi == math.inf):
            sides.append(st.floats(min_value=kind.hi, exclude_min=not kind.hi_open, allow_nan=False))
        drawn = st.one_of(*sides).map(repr)
    return st.one_of(drawn, st.sampled_from(JUNK), st.text(max_size=6)).filter(lambda v: _rejected(kind, v))


def _numeric(action) -> bool:
    from sinkprune.cli_args import port_number

    return isinstance(action.type, Range) or action.type is port_number


NUMERIC = arguments(_numeric)


@settings(SWEEP, max_examples=1000)
@given(data=st.data())
def test_sweep_bad_numbers_exit_2_naming_the_argument(in_box, data):
    entry, prefix, flag, kind = data.draw(st.sampled_from(NUMERIC), label="argument")
    value = data.draw(bad_values(kind), label="value")
    argv = base_argv(in_box, entry, prefix) + [flag, value]
    assert_refused(in_box, entry, argv, names=(flag,))


PATHS = arguments(_path_type)


@settings(SWEEP, max_examples=120)
@given(data=st.data())
def test_sweep_empty_paths_exit_2_naming_the_argument(in_box, data):
    entry, prefix, flag, _ = data.draw(st.sampled_from(PATHS), label="argument")
    value = data.draw(st.sampled_from(["", " ", "\t"]), label="value")
    assert_refused(in_box, entry, base_argv(in_box, entry, prefix) + [flag, value], names=(flag,))


@settings(SWEEP, max_examples=100)
@given(entry=st.sampled_from(sorted(ENTRIES)), junk=st.text(min_size=1, max_size=8).filter(
    lambda t: t.strip() and not t.startswith("-")))
def test_sweep_stray_words_exit_2(in_box, entry, junk):
    """A stray word on any entry point's command line (deploy/render.py included): one line, exit 2."""
    argv = ["generate", "--prompt", "x", junk] if entry == "sinkprune" else [junk]
    assert_refused(in_box, entry, argv)


# ---- no output can be the working directory, a parent of it, home or / ---------------------------

def writers(box) -> dict[str, tuple[str, list[str]]]:
    """Every command that writes a directory, with what it needs to get as far as its output check."""
    return {
        "prune": ("sinkprune", ["prune", "--model", str(box.dense), "--calibration-windows", "2", "--seq-len", "32",
                                "--diffusion-steps", "1", "--every", "1", "--eval-windows", "0"]),
        "adopt": ("sinkprune", ["adopt", "--model", str(box.dense)]),
        "analyze": ("sinkprune", ["analyze", "--model", str(box.dense), "--seq-len", "32", "--windows", "1"]),
        "compare": ("sinkprune", ["compare", "--model", str(box.dense), "--seq-len", "32"]),
        "ship": ("sinkprune", ["ship", "--run", str(box.run)]),
        "train": ("sinkprune", ["train", "--steps", "1"]),
        "build-corpus": ("sinkprune", ["build-corpus", "--cache-dir", str(box.scratch / "cache")]),
        "train-tokenizer": ("sinkprune", ["train-tokenizer", "--train", str(box.prompts)]),
        "loadtest": ("loadtest", ["--prompts", str(box.prompts)]),
        "report": ("report", ["--run", f"dense={box.load}"]),
    }


OUTPUTS = ["", ".", "./", "..", "~", "~/", "/", "here", "here/.", "work/.."]
WRITERS = ["prune", "adopt", "analyze", "compare", "ship", "train", "build-corpus", "train-tokenizer", "loadtest",
           "report"]


@pytest.mark.parametrize("command", WRITERS)
def test_no_command_writes_over_the_working_directory_its_parents_or_home(in_box, command):
    """The issue's variants (`""`, `.`, `./`, `..`, `~`, a symlink to the cwd) and a few more, each with
    --overwrite, for every command that writes a directory: refused, nothing touched."""
    entry, argv = writers(in_box)[command]
    for out in OUTPUTS:
        assert_refused(in_box, entry, argv + ["--out-dir", out, "--overwrite"],
                       names=("argument --out-dir", "is the current directory", "contains the current directory",
                              "is the home directory", "contains the home directory"), scratch=True)
    assert (in_box.cwd / "notes.txt").read_text() == "precious\n"
    assert (in_box.cwd / "work" / "draft.txt").read_text() == "also precious\n"


@pytest.mark.parametrize("command", ["prune", "analyze", "compare", "train-tokenizer", "loadtest", "report"])
def test_overwrite_refuses_a_directory_of_other_files(in_box, command):
    """--overwrite replaces a previous output of ours only: `work/` (a user's draft) is refused by name."""
    entry, argv = writers(in_box)[command]
    line = assert_refused(in_box, entry, argv + ["--out-dir", "work", "--overwrite"], names=("draft.txt",),
                          scratch=True)
    assert "--overwrite replaces only a previous output of ours" in line


def test_the_exact_reproduction_in_a_real_process(box):
    """Issue #25 as filed: in a directory holding notes.txt and work/, `--out-dir "" --overwrite`
    deleted both; now one line, exit 2, both kept. The real process, as a user runs it."""
    before = snapshot(box)
    result = subprocess.run([sys.executable, "-m", "sinkprune", "prune", "--model", "embedded",
                             "--calibration-windows", "2", "--seq-len", "64", "--diffusion-steps", "1", "--every", "1",
                             "--eval-windows", "0", "--out-dir", "", "--overwrite"],
                            cwd=box.cwd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(box.home)})
    INVOCATIONS["sinkprune (process)"] += 1
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sinkprune prune: error: argument --out-dir: '' is an empty path")
    assert snapshot(box) == before


# ---- malformed files of any shape ---------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def any_file() -> st.SearchStrategy[bytes]:
    """Any JSON document, or bytes that may be neither JSON nor UTF-8."""
    return st.one_of(JSON.map(json_bytes), st.binary(max_size=64),
                     st.sampled_from([b"", b"[]", b'{"files": []}', b'{"files": {"../x": 1}}', b"\xff\xfe",
                                      b"[" * 50_000, b"null"]))


def copy_model(box, source: Path, name: str) -> Path:
    target = box.scratch / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


GENERATE = ["generate", "--prompt", "the file", "--steps", "4", "--gen-length", "4", "--block-length", "4"]


@settings(SWEEP, max_examples=80)
@given(content=any_file())
def test_sweep_malformed_manifests_exit_2_naming_the_file(in_box, content):
    artifact = copy_model(in_box, in_box.artifact, "artifact")
    (artifact / "sinkprune.json").write_bytes(content)
    assert_refused(in_box, "sinkprune", GENERATE + ["--model", str(artifact)], names=("sinkprune.json",), scratch=True)


@settings(SWEEP, max_examples=200)
@given(data=st.data())
def test_sweep_malformed_configs_exit_2_naming_the_problem_or_load(in_box, data):
    """config.json replaced by anything, or the valid one with one key changed or dropped: either
    the model loads and generates (exit 0), or one line, exit 2 (naming config.json when the file
    itself is not a config)."""
    model = copy_model(in_box, in_box.dense, "dense")
    whole = data.draw(st.booleans(), label="replace the whole file")
    if whole:
        content = data.draw(any_file().filter(lambda b: not b.startswith(b'{"model_type": "llada"')), label="file")
    else:
        config = dict(in_box.config)
        key = data.draw(st.sampled_from(sorted(config) + ["head_dim", "torch_dtype", "mlp_ratio"]), label="key")
        if data.draw(st.booleans(), label="drop it"):
            config.pop(key, None)
        else:
            config[key] = data.draw(JSON, label="value")
        content = json.dumps(config).encode()
    (model / "config.json").write_bytes(content)
    before = snapshot(in_box, in_box.scratch)
    code, err, seconds = invoke("sinkprune", GENERATE + ["--model", str(model)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 2) and "Traceback" not in err, f"exit {code}: {err!r}"
    OUTCOMES[f"config.json: exit {code}"] += 1
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("sinkprune generate: error: "), err
        try:
            is_object = isinstance(json.loads(content), dict)
        except (ValueError, RecursionError):
            is_object = False
        if not is_object:
            assert "config.json" in lines[0], lines[0]
    assert snapshot(in_box, in_box.scratch) == before and seconds < LIMIT_S


ROUTER = {"weights": {"dense": 0.5, "pruned": 0.5}, "sticky": True, "shadow": False,
          "quality": {"sample_rate": 0.1, "reference": "dense", "samples": 4},
          "cost": {"cpu_replica_hour": 0.1, "window_s": 60}}


def _mutate(document, data) -> object:
    """`document` with one value somewhere in it replaced by anything (a number often by another
    number, NaN and infinities included), or a key dropped."""
    if isinstance(document, (int, float)) and not isinstance(document, bool) and data.draw(st.booleans()):
        return data.draw(st.one_of(st.integers(), st.floats()), label="number")
    if isinstance(document, list) and document and data.draw(st.booleans()):
        return [_mutate(document[0], data), *document[1:]]
    if not isinstance(document, dict) or not document or data.draw(st.integers(0, 4), label="stop") == 0:
        return data.draw(JSON, label="replacement")
    key = data.draw(st.sampled_from(sorted(document)), label="key")
    changed = dict(document)
    if data.draw(st.integers(0, 5), label="drop") == 0:
        changed.pop(key)
    else:
        changed[key] = _mutate(document[key], data)
    return changed


@settings(SWEEP, max_examples=150)
@given(data=st.data())
def test_sweep_malformed_router_configs_exit_2_naming_the_file(in_box, data):
    """--router-config of any shape: serve.local starts (a valid one) or one line naming it, exit 2."""
    path = in_box.scratch / "router.yaml"
    if data.draw(st.booleans(), label="bytes"):
        content = data.draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                                      st.sampled_from([b"weights: [\n  a: b: c\n", b"weights: {dense: -1}\n",
                                                       b"weights: {dense: .nan}\n", b"canary: {gates: {max_quality_gap: .inf}}\n",
                                                       b"- 1\n- 2\n", b"\xff\xfe"])), label="file")
    else:
        content = json.dumps(_mutate(ROUTER, data)).encode()
    path.write_bytes(content)
    before = snapshot(in_box, in_box.scratch)
    code, err, seconds = invoke("serve.local", ["--model", str(in_box.dense), "--pruned", str(in_box.artifact),
                                                "--router-config", str(path)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in ("started", 2), f"exit {code}: {err!r}"
    OUTCOMES[f"router config: {code}"] += 1
    if code == 2:
        assert len(lines) == 1 and "--router-config" in lines[0] and "Traceback" not in err, err
    assert snapshot(in_box, in_box.scratch) == before and seconds < LIMIT_S


@settings(SWEEP, max_examples=120)
@given(data=st.data())
def test_sweep_malformed_load_test_summaries_exit_2_naming_the_file(in_box, data):
    """A load-test summary.json of any shape: the report is written (a valid one) or one line naming it."""
    run = in_box.scratch / "load"
    run.mkdir(exist_ok=True)
    if data.draw(st.booleans(), label="bytes"):
        content = data.draw(any_file(), label="file")
    else:
        content = json.dumps(_mutate(_summary(), data)).encode()
    (run / "summary.json").write_bytes(content)
    out = in_box.scratch / "report"
    shutil.rmtree(out, ignore_errors=True)
    variant = data.draw(st.sampled_from(["dense", "routed"]), label="variant")  # forced runs draw a plot
    before = snapshot(in_box, in_box.scratch)
    code, err, seconds = invoke("report", ["--run", f"{variant}={run}", "--out-dir", str(out)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 2) and "Traceback" not in err, f"exit {code}: {err!r}"
    OUTCOMES[f"summary.json: exit {code}"] += 1
    if code == 2:
        assert len(lines) == 1 and "summary.json" in lines[0], err
    assert snapshot(in_box, in_box.scratch) == before and seconds < LIMIT_S


def test_the_alarm_stops_a_run_that_takes_too_long(monkeypatch):
    """The per-invocation limit is enforced, not just measured: a run past it fails its example."""
    monkeypatch.setattr(sys.modules[__name__], "LIMIT_S", 0.2)
    monkeypatch.setitem(ENTRIES, "slow", lambda argv: time.sleep(5))
    began = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="still running after 0.2 s"):
        invoke("slow", [])
    assert time.monotonic() - began < 2
    INVOCATIONS.pop("slow")


def test_version_on_every_entry_point(in_box):
    from sinkprune.cli_args import version_string

    progs = {"sinkprune": "sinkprune", "loadtest": "python -m loadtest", "report": "python -m loadtest.report",
             "serve.local": "python -m serve.local", "render": "python deploy/render.py"}
    for entry in ENTRIES:
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit) as stop:
            ENTRIES[entry](["--version"])
        INVOCATIONS[entry] += 1
        assert stop.value.code == 0 and out.getvalue() == f"{progs[entry]} {version_string()}\n", entry


def test_zz_how_many_invocations_the_sweep_tried():
    """Runs last in this module (pytest keeps file order): the count the issue asks to report."""
    total = sum(INVOCATIONS.values())
    print(f"\ncli sweep: {total} invocations {dict(INVOCATIONS)}; outcomes {dict(OUTCOMES)}")
