"""The cuSPARSELt algorithm survey's logic and the serving path's use of its table (the GPU runs are in the
survey itself: `python -m benchmarks.cusparselt_algs`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cusparselt_algs import (PROBE_M, grid_tasks, markdown, probe_tasks, served_shapes, serving_table,
                                        summarize, survivors)
from sinkkernels import cusparselt
from sinkprune.dlm import DLMConfig
from sinkprune.dlm.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def entry(n, k, m, alg, state="done", search=False, **result):
    task = {"n": n, "k": k, "m": m, "alg": alg, "warmup": 1, "reps": 1, **({"search": True} if search else {})}
    return {"task": task, "state": state, **({"result": result} if state == "done" else {})}


def test_served_shapes_are_the_fused_linears():
    assert served_shapes(DLMConfig.from_hf_config(PRESETS["llada-8b"])) == \
        [(12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
    assert served_shapes(DLMConfig.from_hf_config(PRESETS["dream-7b"])) == \
        [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]


def test_ids_that_crash_their_probe_are_never_tried_again():
    first = [entry(64, 32, PROBE_M, 0, max_alg_id=3, us=5, dense_us=4, max_rel_err=0.01),
             entry(64, 32, 512, 0, max_alg_id=2, us=9, dense_us=8, max_rel_err=0.01),
             entry(96, 32, PROBE_M, 0, max_alg_id=3, us=5, dense_us=4, max_rel_err=0.01),
             entry(96, 32, 512, 0, state="crashed")]
    probes = probe_tasks(first, (64, 32), 1, 1)
    assert [(t["m"], t["alg"]) for t in probes] == [(PROBE_M, 1), (PROBE_M, 2), (PROBE_M, 3)]
    ran = [{"task": probes[0], "state": "crashed"}, {"task": probes[1], "state": "done"},
           {"task": probes[2], "state": "error"}]
    assert survivors(ran) == [2, 3]
    grid = grid_tasks(first, [2, 3], (64, 32))
    # not the probed (shape, M), not where id 0 crashed, not an id the library did not offer (3 > 2 at M 512)
    assert [(t["n"], t["m"], t["alg"]) for t in grid] == [(64, 512, 2), (96, PROBE_M, 2), (96, PROBE_M, 3)]


def test_the_fastest_id_must_run_match_id_0_and_share_the_serving_layout():
    entries = [entry(64, 32, 256, 0, us=10.0, dense_us=8.0, max_rel_err=0.004),
               entry(64, 32, 256, 1, us=4.0, max_rel_err=0.004, same_layout=False),  # other layout: unusable
               entry(64, 32, 256, 2, us=5.0, max_rel_err=0.05, same_layout=True),  # inaccurate: unusable
               entry(64, 32, 256, 3, us=6.0, max_rel_err=0.005, same_layout=True),
               entry(64, 32, 256, 4, state="crashed"),
               entry(64, 32, 1024, 0, us=20.0, dense_us=30.0, max_rel_err=0.004),
               {**entry(64, 32, 1024, 0, search=True, us=1.0, max_rel_err=0.004), "alg": 5}]  # a search: reported
    rows = summarize(entries)
    assert [(r["m"], r["best_alg"], r["best_us"]) for r in rows] == [(256, 3, 6.0), (1024, 0, 20.0)]
    assert rows[0]["best_vs_alg0"] == pytest.approx(10 / 6) and rows[1]["best_vs_dense"] == pytest.approx(1.5)
    table = serving_table(rows, "NVIDIA H200", "0.8.0")
    assert table == {"device": "NVIDIA H200", "cusparselt": "0.8.0", "algorithms": {"64,32,256": 3}}
    text = markdown(rows, entries)
    assert "| 64 | 32 | 256 | 8.0 | 10.0 | 3 | 6.0 | 1.33x | 1.67x |" in text and "crashed or hung: id 4" in text


def test_the_serving_path_takes_the_tables_id_only_on_the_gpu_and_library_it_was_measured_on(tmp_path, monkeypatch,
                                                                                               capsys):
    table = {"device": "NVIDIA H200", "cusparselt": "0.8.0", "algorithms": {"64,32,256": 3}}
    assert cusparselt.choose_algorithm(table, "NVIDIA H200", "0.8.0", 64, 32, 256) == 3
    assert cusparselt.choose_algorithm(table, "NVIDIA H200", "0.8.0", 64, 32, 512) == 0
    assert cusparselt.choose_algorithm(table, "NVIDIA H100 80GB HBM3", "0.8.0", 64, 32, 256) == 0
    assert "measured on NVIDIA H200" in capsys.readouterr().err
    assert cusparselt.choose_algorithm(table, "NVIDIA H200", "0.7.1", 64, 32, 256) == 0
    assert cusparselt.choose_algorithm(None, "NVIDIA H200", "0.8.0", 64, 32, 256) == 0
    path = tmp_path / "algs.json"
    monkeypatch.setenv(cusparselt.ENV_ALGORITHMS, str(path))
    for text, message in ((None, "cannot read"), ("{", "cannot read"),
                          (json.dumps({**table, "algorithms": {"64,32,256": -1}}), "expected")):
        cusparselt.algorithm_table.cache_clear()
        if text is not None:
            path.write_text(text)
        with pytest.raises(RuntimeError, match=message):
            cusparselt.algorithm_table()
    path.write_text(json.dumps(table))
    cusparselt.algorithm_table.cache_clear()
    assert cusparselt.algorithm_table() == table
    cusparselt.algorithm_table.cache_clear()


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")


@pytest.mark.parametrize("args, message", [pytest.param([], "needs a CUDA GPU", marks=NO_GPU),
                                           (["--m", "32,40"], "multiple of 16")])
def test_the_survey_refuses_what_it_cannot_do(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "benchmarks.cusparselt_algs", "--out", str(tmp_path / "a.json"),
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a.json").exists()


@NO_GPU
def test_a_survey_task_runs_in_a_child_and_reports_why_it_failed_here(tmp_path, monkeypatch):
    """The child imports the survey's task by name; on a CPU the task fails cleanly, as an entry, not a crash."""
    from sinkkernels.isolated import run_isolated
    monkeypatch.chdir(ROOT)
    [result] = run_isolated("benchmarks.cusparselt_algs:measure", [entry(64, 32, 256, 0)["task"]], tmp_path,
                            task_seconds=60, total_seconds=120)
    assert result["state"] == "error" and "CUDA" in result["message"], result


@NO_GPU
def test_the_survey_keeps_its_childrens_logs_in_the_report_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    """The whole survey on a CPU, where every task fails (no CUDA): every phase runs its children in a folder
    of its own beside --out, the report keeps their logs, and the folder is gone afterwards."""
    import benchmarks.cusparselt_algs as survey

    class Library:
        @staticmethod
        def version():
            return "0.8.0"

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "no GPU")
    monkeypatch.setattr(cusparselt, "extension", lambda: Library)
    (tmp_path / "mine").mkdir()
    out = tmp_path / "algs.json"
    assert survey.main(["--models", "dream-7b", "--m", "256,1024", "--out", str(out), "--seconds", "120"]) == 0
    report = json.loads(out.read_text())
    assert report["rows"] == [] and {e["state"] for e in report["entries"]} == {"error"}
    assert len([e for e in report["entries"] if e["task"].get("search")]) == 4  # errors do not end the searches
    assert set(report["child_logs"]) == {"default", "probe", "grid", "search0", "search1", "search2", "search3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["algs.json", "mine"]
