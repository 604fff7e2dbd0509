"""Every command-line entry point answers bad input with exit code 2 and one line naming
what is wrong: never a traceback, never a usage block."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import random_model, tiny_hf_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny dense model directory (with the shipped tokenizer), a 2:4 directory without its
    manifest, a non-empty directory, and a file of prompts."""
    from sinkprune.artifact import write_artifact
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm import DLMConfig, build_model
    from sinkprune.dlm.artifact_io import MANIFEST
    from sinkprune.dlm.loading import load_tokenizer, save_model
    from sinkprune.prune import PruneSettings, prune_model

    root = tmp_path_factory.mktemp("cli")
    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id, "bos_token_id": 0}
    save_model(build_model(DLMConfig.from_hf_config(hf)), root / "dense", tokenizer=tokenizer)
    model = random_model("llada", dtype=torch.float32)
    prune_model(model, PruneSettings("magnitude", "2:4", [0.5]), torch.randint(3, 90, (2, 8)))
    write_artifact(model, root / "nomanifest", None, {"pattern": "2:4"})
    (root / "nomanifest" / MANIFEST).unlink()
    (root / "full").mkdir()
    (root / "full" / "results.json").write_text("{}")
    (root / "run").mkdir()
    (root / "run" / "notes.txt").write_text("not a training run")
    (root / "finished" / "final").mkdir(parents=True)
    (root / "finished" / "final" / "config.json").write_text("{}")
    (root / "router-typo.yaml").write_text("canary:\n  variant: pruned\n  gates: {max_qualty_gap: 0.5}\n")
    (root / "router-both.yaml").write_text("weights: {dense: 1}\ncanary: {variant: pruned}\n")
    (root / "router-key.yaml").write_text("canery: {}\n")
    (root / "router-negative.yaml").write_text("weights: {dense: -1, pruned: 2}\n")
    (root / "router-broken.yaml").write_text("weights: [\n  a: b: c\n")
    for name, content in [("list", b"[]"), ("files", b'{"files": []}'), ("bytes", b"\xff\xfe{}")]:
        shutil.copytree(root / "nomanifest", root / f"manifest-{name}")
        (root / f"manifest-{name}" / MANIFEST).write_bytes(content)
    (root / "badload").mkdir()
    (root / "badload" / "summary.json").write_text("[]")
    return root


def _sinkprune(*argv):
    from sinkprune.cli import main

    return main(list(argv))


def _loadtest(*argv):
    from loadtest.cli import main

    return main(list(argv))


def _report(*argv):
    from loadtest.report import main

    return main(list(argv))


def _serve_local(monkeypatch, *argv):
    from serve import local

    monkeypatch.setattr(sys, "argv", ["serve.local", *argv])
    monkeypatch.setattr(local, "local_app", lambda *a, **k: pytest.fail("started serving on bad input"))
    return local.main()


def _render(monkeypatch, *argv, missing: bool = False):
    spec = importlib.util.spec_from_file_location("deploy_render_cli", ROOT / "deploy" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    if missing:
        manifest, key, _, literal = render.EMBEDDED[0]
        monkeypatch.setattr(render, "EMBEDDED", [(manifest, key, ROOT / "deploy" / "no-such-serve.yaml", literal)])
    return render.main(list(argv))


def _no_calibration(*args, **kwargs):
    raise AssertionError("calibration started before the pattern was checked")


# (entry point, arguments, what the one line must name); `{d}` is the fixture's directory
CASES = [
    ("sinkprune", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("sinkprune", ["eval", "--model", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--device", "cuda"],
     "device 'cuda' is not available on this machine; available: cpu"),
    ("sinkprune", ["generate", "--prompt", "hi", "--device", "cuda:1"], "device 'cuda:1' is not available"),
    ("sinkprune", ["generate", "--prompt", "hi", "--device", "gpu0"], "'gpu0' is not a device name; available: cpu"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--pattern", "2:3"],
     "pattern 2:3 does not fit layer model.transformer.blocks.0.q_proj: its 64 input features"),
    ("sinkprune", ["compare", "--model", "{d}/dense", "--out-dir", "{d}/c", "--patterns", "2:4,2:3"],
     "pattern 2:3 does not fit layer"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--pattern", "half"], "unknown pattern 'half'"),
    ("sinkprune", ["prune", "--model", "{d}/missing", "--out-dir", "{d}/p"], "missing' does not exist"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/dense", "--overwrite"],
     "is the source"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/full"], "full is not empty; pass --overwrite"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--calibration-windows", "many"],
     "argument --calibration-windows: 'many' is not an integer; valid: 1..1000000"),
    ("sinkprune", ["generate", "--model", "{d}/nomanifest", "--prompt", "hi"], "sinkprune.json is missing"),
    ("sinkprune", ["analyze", "--model", "{d}/dense", "--text", "{d}/missing.txt", "--out-dir", "{d}/a"],
     "missing.txt' does not exist"),
    ("sinkprune", ["eval", "--model", "{d}/dense", "--windows", "1"], "argument --windows: 1 is outside 2..1000000"),
    ("sinkprune", ["train", "--out-dir", "{d}/run"], "holds files that `sinkprune train` did not write"),
    ("sinkprune", ["ship", "--run", "{d}/missing"], "has no final/ model"),
    ("sinkprune", ["adopt", "--model", "{d}/dense", "--out-dir", "{d}/x"], "declares no 2:4 sparse-24-bitmask"),
    # every command that writes a directory refuses a non-empty one before any work
    ("sinkprune", ["ship", "--run", "{d}/finished"], "embedded/model is not empty; pass --overwrite"),
    ("sinkprune", ["ship", "--run", "{d}/finished", "--out-dir", "{d}/finished/final/x", "--overwrite"],
     "is inside the source"),
    ("sinkprune", ["analyze", "--model", "{d}/dense", "--out-dir", "{d}/full"], "full is not empty"),
    ("sinkprune", ["compare", "--model", "{d}/dense", "--out-dir", "{d}/full"], "full is not empty"),
    ("sinkprune", ["build-corpus", "--out-dir", "{d}/full", "--cache-dir", "{d}/cache"], "full is not empty"),
    ("sinkprune", ["train-tokenizer", "--train", "{d}/full/results.json", "--out-dir", "{d}/full"],
     "full is not empty"),
    ("report", ["--run", "dense={d}/missing", "--out-dir", "{d}/full"], "full is not empty"),
    ("sinkprune", ["train-tokenizer", "--train", "{d}/missing.txt"], "missing.txt not found"),
    ("loadtest", ["--prompts", "{d}/missing.txt"], "missing.txt' does not exist"),
    ("loadtest", ["--rates", "fast"], "--rates 'fast' is not a comma-separated list of numbers"),
    ("loadtest", ["--out-dir", "{d}/full"], "full is not empty; pass --overwrite"),
    ("loadtest", ["--extra", "[1, 2]"], "--extra must be a JSON object"),
    ("report", ["--run", "dense={d}/missing"], "--run dense={d}/missing: {d}/missing/summary.json does not exist"),
    ("report", ["--run", "{d}/full"], "is not VARIANT=DIR"),
    ("report", ["--run", "dense={d}/full", "--metrics-before", "{d}/nope.txt"], "nope.txt' does not exist"),
    ("serve.local", ["--port", "99999"], "argument --port: port 99999 is outside 1..65535"),
    ("serve.local", ["--pruned", "{d}/missing"], "missing' does not exist"),
    ("serve.local", ["--max-tokens", "0"], "argument --max-tokens: 0 is outside 1..4096"),
    ("serve.local", ["--max-body-bytes", "10"], "argument --max-body-bytes: 10 is outside 1024..1073741824"),
    ("serve.local", ["--router-config", "{d}/router-typo.yaml"],
     "--router-config canary.gates.max_qualty_gap: Extra inputs are not permitted"),
    ("serve.local", ["--router-config", "{d}/router-both.yaml"], "the canary sets the weights"),
    ("serve.local", ["--router-config", "{d}/router-key.yaml"], "unknown keys ['canery']"),
    ("serve.local", ["--router-config", "{d}/missing.yaml"], "missing.yaml' does not exist"),
    # issue #25: what a careless user tried
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "", "--overwrite"],
     "argument --out-dir: '' is an empty path (it would mean the current directory)"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", ".", "--overwrite"], "is the current directory"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "..", "--overwrite"],
     "contains the current directory"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/full", "--overwrite"],
     "is not a pruned artifact whose sinkprune.json lists everything in it (results.json)"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--seq-len", "-1"],
     "argument --seq-len: -1 is outside 2..1048576"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--seq-len", "0"],
     "argument --seq-len: 0 is outside 2..1048576"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--seq-len", "100000"],
     "--seq-len 100000 exceeds the 4096-token maximum sequence length of the model"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--batch-size", "0"],
     "argument --batch-size: 0 is outside 1..65536"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--batch-size", "-2"],
     "argument --batch-size: -2 is outside 1..65536"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--eval-windows", "-1"],
     "argument --eval-windows: -1 is outside 0..1000000"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--eval-windows", "2", "--eval-samples", "0"],
     "argument --eval-samples: 0 is outside 1..1000000"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--hidden-states", "disk", "--hidden-dir",
                   "/nonexistent/dir"], "argument --hidden-dir: directory '/nonexistent/dir' does not exist"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--hidden-dir", "{d}/full/results.json"],
     "results.json' is not a directory"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--k", "nan"],
     "argument --k: 'nan' is not a number (NaN); valid: [0, 100]"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--alpha", "-5"],
     "argument --alpha: -5 is outside (0, 1000]"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--calibration-windows", "100000000"],
     "argument --calibration-windows: 100000000 is outside 1..1000000"),
    ("sinkprune", ["prune", "--model", "{d}/dense", "--out-dir", "{d}/p", "--calibration-windows", "1000000"],
     "--calibration-windows 1000000: the calibration split holds only"),
    ("sinkprune", ["generate", "--model", "{d}/manifest-list", "--prompt", "hi"], "sinkprune.json holds a JSON list"),
    ("sinkprune", ["generate", "--model", "{d}/manifest-files", "--prompt", "hi"],
     "sinkprune.json: `files` is a JSON list, not an object"),
    ("sinkprune", ["generate", "--model", "{d}/manifest-bytes", "--prompt", "hi"], "sinkprune.json is not UTF-8 text"),
    ("sinkprune", ["generate", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: -1 is outside [0, 100]"),
    ("sinkprune", ["generate", "--prompt", "hi", "--cfg-scale", "-1"], "argument --cfg-scale: -1 is outside [0, 100]"),
    ("sinkprune", ["generate", "--prompt", ""], "--prompt '' is empty"),
    ("sinkprune", ["generate", "--prompt", "hi", "--steps", "1000", "--gen-length", "8", "--block-length", "8"],
     "--steps 1000 exceeds --gen-length 8"),
    ("sinkprune", ["generate", "--prompt", "hi", "--gen-length", "100000", "--block-length", "100000"],
     "--gen-length 100000 exceeds the 1024-token maximum sequence length of the model 'embedded'"),
    ("loadtest", ["--timeout", "-1"], "argument --timeout: -1 is outside (0, 1000000]"),
    ("loadtest", ["--prompt-words", "0"], "argument --prompt-words: 0 is outside 1..10000"),
    ("report", ["--run", "dense={d}/badload"], "summary.json: not a load-test summary"),
    ("serve.local", ["--router-config", "{d}/router-negative.yaml"], "weights.dense: -1 is negative"),
    ("serve.local", ["--port", "8123", "--metrics-port", "8123"], "--port 8123 and --metrics-port 8123 are the same"),
    ("serve.local", ["--max-tokens", "2000"],
     "--max-tokens 2000 leaves no room for a prompt in the 1024-token maximum sequence length of the model 'embedded'"),
    ("serve.local", ["--router-config", "{d}/router-broken.yaml"], "cannot be read as YAML at line 2, column 7"),
    ("render", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("render", ["--check", "missing"], "no-such-serve.yaml"),
]


@pytest.mark.parametrize("entry, argv, expected", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_gives_exit_2_and_one_line_naming_it(dirs, monkeypatch, capsys, entry, argv, expected):
    import sinkprune.prune

    monkeypatch.setattr(sinkprune.prune, "prune_model", _no_calibration)
    monkeypatch.chdir(dirs)
    argv = [a.replace("{d}", str(dirs)) for a in argv]
    expected = expected.replace("{d}", str(dirs))
    calls = {"sinkprune": _sinkprune, "loadtest": _loadtest, "report": _report,
             "serve.local": lambda *a: _serve_local(monkeypatch, *a),
             "render": lambda *a: _render(monkeypatch, *(x for x in a if x != "missing"), missing="missing" in a)}
    try:
        code = calls[entry](*argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["-m", "sinkprune", "generate", "--prompt", "x", "--device", "cuda"], "sinkprune generate: error: argument --device"),
    (["-m", "loadtest.report", "--run", "dense=/nonexistent"], "python -m loadtest.report: error: --run dense="),
])
def test_the_real_processes_print_one_line_too(argv, expected):
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(expected), result.stderr


def test_version_and_help_show_defaults_and_patterns(capsys):
    from sinkprune.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sinkprune 0.")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "structured:<ratio>" in text and "unstructured:<ratio>" in text
    assert "--calibration-windows CALIBRATION_WINDOWS default: 128" in text
    assert "--device DEVICE default: cpu" in text
