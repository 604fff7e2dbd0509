"""The default method is the one the project's own comparison measured best, and says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkprune.choice import DEFAULTS, choose, default_method
from sinkprune.compare import choice_text
from sinkprune.prune import PruneSettings, check_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["nm", "unstructured"])
def test_the_defaults_are_what_the_committed_comparisons_choose(kind):
    default = DEFAULTS[kind]
    report = json.loads((ROOT / default.source / "compare.json").read_text())
    choice = choose(report)[default.measured_at]
    assert (choice.method, choice.calibration, choice.sink_weighting) == (default.method, default.calibration, "mean")
    assert round(choice.delta, 4) == default.delta
    best_other = choice.other_methods[0]
    assert (best_other["label"], round(best_other["delta"], 4)) == (default.next_method, default.next_delta)


@pytest.mark.parametrize("pattern, method, calibration, says", [
    ("2:4", "sink-sparsegpt", "noised", "docs/embedded/compare:"),
    ("4:8", "sink-sparsegpt", "noised", "measured at 2:4"),
    ("unstructured:0.5", "sink-sparsegpt", "noised", "docs/embedded/compare_unstructured:"),
    ("unstructured:0.7", "sink-sparsegpt", "noised", "measured at unstructured:0.5"),
    ("structured:0.3", "sink-wanda", "clean", "no comparison covers"),
])
def test_auto_method_resolves_per_pattern_and_says_why(pattern, method, calibration, says):
    settings = PruneSettings("auto", pattern)
    assert (settings.method, settings.calibration) == (method, calibration)
    assert settings.method_choice.startswith("auto: ") and says in settings.method_choice
    assert settings.to_dict()["method_choice"] == settings.method_choice  # it goes into the manifest
    assert default_method(pattern)[:2] == (method, calibration)
    check_settings(settings)


def test_auto_method_keeps_an_explicit_calibration_and_explicit_methods_are_untouched():
    assert PruneSettings("auto", "2:4", calibration="clean").calibration == "clean"
    assert PruneSettings("auto", "2:4", sink_weighting="per-timestep").calibration == "noised"
    explicit = PruneSettings("sink-wanda", "2:4")
    assert (explicit.method, explicit.calibration, explicit.method_choice) == ("sink-wanda", "clean", "")


def test_auto_method_with_a_bad_pattern_names_the_pattern():
    with pytest.raises(ValueError, match="unknown pattern .half."):
        check_settings(PruneSettings("auto", "half"))


def _row(method, calibration, seed, delta, weighting="-", **pairs):
    return {"pattern": "2:4", "method": method, "calibration": calibration, "sink_weighting": weighting,
            "calibration_seed": seed, "vs_dense": {"delta_nll": delta, "delta_nll_stderr": 0.001}, **pairs}


def test_choose_ranks_by_the_mean_over_draws_and_reports_the_pairings_of_the_winner():
    pair = {"vs_baseline": {"baseline": "sparsegpt", "calibration": "noised", "delta_nll": -0.002,
                            "delta_nll_stderr": 0.0005}}
    report = {"rows": [
        _row("magnitude", "-", 0, 0.14),
        _row("sparsegpt", "noised", 0, 0.004), _row("sink-sparsegpt", "noised", 0, 0.003, "mean", **pair),
        _row("sparsegpt", "noised", 1, 0.012), _row("sink-sparsegpt", "noised", 1, 0.004, "mean", **pair),
        _row("wanda", "clean", 0, 0.001), _row("wanda", "clean", 1, 0.2),  # best single draw, worst mean
    ]}
    choice = choose(report)["2:4"]
    assert (choice.method, choice.calibration) == ("sink-sparsegpt", "noised")
    assert choice.delta == pytest.approx(0.0035) and [d["calibration_seed"] for d in choice.draws] == [0, 1]
    assert choice.runner_up == {"label": "sparsegpt (noised)", "delta": pytest.approx(0.008)}
    assert [p["baseline"] for p in choice.paired] == ["sparsegpt (noised)"] and len(choice.paired[0]["draws"]) == 2
    assert [o["label"] for o in choice.other_methods] == ["sparsegpt (noised)", "wanda (clean)", "magnitude"]
    text = choice_text(report)
    assert "2:4: sink-sparsegpt (noised): +0.0035" in text and "paired against sparsegpt (noised)" in text


def test_prune_command_without_method_uses_the_measured_best_and_records_why(tmp_path, capsys):
    from sinkprune.artifact import MANIFEST
    from sinkprune.cli import main
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm import DLMConfig, build_model, save_model
    from sinkprune.dlm.loading import load_tokenizer
    from tests.conftest import tiny_hf_config

    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id, "bos_token_id": 0}
    save_model(build_model(DLMConfig.from_hf_config(hf)), tmp_path / "dense", tokenizer=tokenizer)
    assert main(["prune", "--model", str(tmp_path / "dense"), "--calibration-windows", "2", "--seq-len", "32",
                 "--diffusion-steps", "4", "--every", "2", "--eval-windows", "0",
                 "--out-dir", str(tmp_path / "pruned")]) == 0
    printed = capsys.readouterr().out
    assert "method: sink-sparsegpt, calibration noised (auto: " in printed and "(2:4, sink-sparsegpt)" in printed
    manifest = json.loads((tmp_path / "pruned" / MANIFEST).read_text())
    assert manifest["method"] == "sink-sparsegpt" and manifest["calibration"]["inputs"] == "noised"
    assert manifest["method_choice"].startswith("auto: sink-sparsegpt (noised)")
    assert manifest["calibration"]["windows"] == 2 and manifest["timesteps"] == [1.0, 0.5]
