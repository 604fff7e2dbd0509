"""No command overwrites data: refusal of non-empty or source outputs, staged writes, whole replacement."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sinkprune.artifact import write_artifact
from sinkprune.dlm.artifact_io import MANIFEST
from sinkprune.dlm.loading import load_model, save_model
from sinkprune.safe_output import OutputError, check_output, staged_output
from tests.conftest import random_model


def _model_24():
    from sinkprune.prune import PruneSettings, prune_model

    model = random_model("llada", dtype=torch.float32)
    prune_model(model, PruneSettings("magnitude", "2:4", [0.5]), torch.randint(3, 90, (2, 8)))
    return model


def test_a_non_empty_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert check_output(out) == out.resolve()  # empty: fine
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match=rf"{out} is not empty; pass --overwrite"):
        check_output(out)
    # --overwrite replaces only what the command itself writes (here: report.md), never other files
    with pytest.raises(OutputError, match=r"holds what this command does not write \(keep.txt\)"):
        check_output(out, overwrite=True, ours=["report.md"])
    with pytest.raises(OutputError, match=r"not a pruned artifact whose sinkprune.json lists everything in it"):
        check_output(out, overwrite=True)
    assert check_output(out, overwrite=True, ours=["keep.txt", "report.md"]) == out.resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output(tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("out", ["", " ", ".", "./", "..", "~", "~/", "/", "here", "here/..", "work/.."])
def test_the_working_directory_its_parents_home_and_root_are_never_an_output(tmp_path, monkeypatch, out):
    """Issue #25: `--out-dir ""` meant the current directory and --overwrite replaced it. Refused now
    (with --overwrite, even where they are empty), and so are `.`, `..`, `~`, `/` and a symlink to
    the working directory."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (cwd / "work").mkdir(parents=True)
    home.mkdir()
    (cwd / "here").symlink_to(cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputError, match="empty path|current directory|home directory"):
        check_output(out, overwrite=True)
    with pytest.raises(OutputError):
        with staged_output(out, overwrite=True, ours=["work", "here"]):
            pytest.fail("staged an output over the working directory")
    assert sorted(p.name for p in cwd.iterdir()) == ["here", "work"]


@pytest.mark.parametrize("relation", ["equal", "inside", "contains"])
def test_an_output_equal_to_inside_or_containing_the_source_is_always_refused(tmp_path, relation):
    source = tmp_path / "models" / "dense"
    source.mkdir(parents=True)
    out = {"equal": source, "inside": source / "pruned", "contains": tmp_path / "models"}[relation]
    with pytest.raises(OutputError, match="source"):
        check_output(out, overwrite=True, sources=[source])


def test_a_failed_write_leaves_the_old_directory_as_it_was_and_no_partial(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True, ours=["old.txt"]) as staging:
            (staging / "half.bin").write_bytes(b"half")
            raise RuntimeError("killed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_run_leaves_no_half_artifact(tmp_path):
    """SIGKILL while writing: the output never appears; only the hidden partial sibling remains."""
    script = (f"import sys, time; sys.path.insert(0, {str(os.getcwd())!r})\n"
              "from sinkprune.safe_output import staged_output\n"
              f"with staged_output({str(tmp_path / 'out')!r}) as d:\n"
              "    (d / 'model.safetensors').write_bytes(b'x' * 1000)\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (tmp_path / "out").exists()
    assert [p.name.startswith(".out.partial-") for p in tmp_path.iterdir()] == [True]


def test_overwrite_replaces_the_whole_directory_no_stale_shard_or_index(tmp_path):
    """--overwrite replaces a previous artifact (recognised by its manifest, which lists every
    file in it) as a whole; a directory holding anything else is refused and left as it was."""
    from sinkprune.dlm.artifact_io import sha256_file

    model = _model_24()
    out = tmp_path / "artifact"
    save_model(model, out, max_shard_bytes=20_000)  # old dense shards + index, no manifest: not ours
    before = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in before
    with pytest.raises(OutputError, match="not empty"):
        write_artifact(model, out, None, {"pattern": "2:4"})
    with pytest.raises(OutputError, match="not a pruned artifact whose sinkprune.json lists everything"):
        write_artifact(model, out, None, {"pattern": "2:4"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # refused: untouched
    # an earlier artifact of ours, sharded: its manifest lists every file
    (out / MANIFEST).write_text(json.dumps({"pattern": "2:4", "files": {n: sha256_file(out / n) for n in before}}))
    (out / "notes.txt").write_text("unrelated")
    with pytest.raises(OutputError, match=r"\(notes.txt\): --overwrite replaces only a previous output of ours"):
        write_artifact(model, out, None, {"pattern": "2:4"}, overwrite=True)
    assert (out / "notes.txt").read_text() == "unrelated"
    (out / "notes.txt").unlink()
    write_artifact(model, out, None, {"pattern": "2:4"}, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", MANIFEST]
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == set(names) - {MANIFEST}
    load_model(out, with_tokenizer=False)


def test_artifacts_keep_remote_code_auto_map_generation_config_and_normal_modes(tmp_path):
    from transformers import GenerationConfig

    model = _model_24()
    source = tmp_path / "src"
    model.config.hf_config["auto_map"] = {"AutoConfig": "configuration_llada.LLaDAConfig",
                                          "AutoModel": "modeling_llada.LLaDAModelLM"}
    save_model(model, source)
    (source / "configuration_llada.py").write_text("# remote config code\n")
    (source / "modeling_llada.py").write_text("# remote model code\n")
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": 126081, "max_length": 4096}))
    old_mask = os.umask(0o022)
    try:
        out = write_artifact(model, tmp_path / "pruned", None, {"pattern": "2:4"}, source_dir=source)
    finally:
        os.umask(old_mask)
    assert (out / "configuration_llada.py").read_text() == "# remote config code\n"
    assert (out / "modeling_llada.py").read_text() == "# remote model code\n"
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert GenerationConfig.from_pretrained(str(out)).max_length == 4096
    assert {"configuration_llada.py", "generation_config.json"} <= set(json.loads((out / MANIFEST).read_text())["files"])
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: oct(0o644) for p in out.iterdir()}


def test_save_model_writes_a_generation_config_from_the_token_ids(tmp_path):
    from transformers import GenerationConfig

    model = random_model("dream", dtype=torch.float32)
    out = save_model(model, tmp_path / "m")
    generation = GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == model.config.hf_config["eos_token_id"]
    assert generation.pad_token_id == model.config.hf_config["pad_token_id"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_resumes_its_own_run_refuses_others_and_overwrite_starts_over(tmp_path, capsys):
    """`sinkprune train` writes into its run directory: a run there is resumed (that is not
    overwriting), a run of another model or foreign files are refused, --overwrite starts over."""
    from sinkprune.cli import main

    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"line {i}: the function returns a value and the table has rows." for i in range(400)))
    run = tmp_path / "run"
    flags = ["train", "--train", str(text), "--out-dir", str(run), "--d-model", "32", "--heads", "2", "--layers", "1",
             "--mlp-hidden", "64", "--seq-len", "32", "--batch-size", "2", "--eval-every", "100",
             "--checkpoint-every", "1", "--warmup", "1"]

    def log_steps() -> list[int]:
        return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert main(flags + ["--steps", "1"]) == 0
    assert main(flags + ["--steps", "2"]) == 0
    assert "resuming the run" in capsys.readouterr().out
    assert log_steps() == [1, 2] and (run / "final" / "config.json").is_file()
    assert main(flags[:-2] + ["--warmup", "1", "--steps", "3", "--d-model", "64", "--heads", "2"]) == 2
    assert "holds a run of another model" in capsys.readouterr().err
    assert main(flags + ["--steps", "1", "--overwrite"]) == 0
    assert log_steps() == [1]
    (run / "notes.txt").write_text("mine")
    assert main(flags + ["--steps", "2"]) == 2
    assert "did not write" in capsys.readouterr().err and (run / "notes.txt").read_text() == "mine"
