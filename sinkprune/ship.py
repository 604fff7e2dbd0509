"""Shipping a trained run as the embedded default: weights, tokenizer and a model
card whose every number is measured here, at shipping time."""
from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch

from sinkprune.dlm.generate import generate
from sinkprune.dlm.likelihood import estimate_nll, paired_difference
from sinkprune.dlm.loading import build_model, load_model, save_model
from sinkprune.dlm.prompt import decode_completion, encode_prompt
from sinkprune.evaluate import text_windows
from sinkprune.train import LOG, init_weights

SAMPLE_PROMPTS = ("The function returns", "To create a table, use", "In Python, a list is")


def training_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {"steps": records[-1]["step"], "train_seconds": records[-1]["elapsed_s"],
            "final_train_loss": sum(r["loss"] for r in records[-50:]) / min(50, len(records)),
            "eval_loss_curve": [(r["step"], round(r["eval_loss"], 4)) for r in evals],
            "train_config": checkpoint["train_config"]}


def ship(run_dir: str | Path, out_dir: str | Path, eval_windows: int = 64, samples: int = 16,
         dtype: torch.dtype = torch.bfloat16, compare_report: str | Path | None = None) -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, tokenizer = load_model(run_dir / "final", dtype=torch.float32)
    save_model(model, out_dir, tokenizer=tokenizer, dtype=dtype)
    shipped, _ = load_model(out_dir)
    summary = training_summary(run_dir)
    untrained = build_model(model.config)
    init_weights(untrained, summary["train_config"]["init_std"], summary["train_config"]["seed"])
    seq_len = summary["train_config"].get("seq_len", 256)
    windows = text_windows(tokenizer, "evaluation", eval_windows, seq_len)
    if len(windows) < eval_windows:
        raise ValueError(f"--eval-windows {eval_windows}: the evaluation split holds only {len(windows)} windows of "
                         f"{seq_len} tokens (the run's sequence length); ask for at most {len(windows)}")
    results = {name: estimate_nll(m, windows, samples=samples, seed=0, progress=True)
               for name, m in (("untrained", untrained), ("trained_fp32", model), ("shipped", shipped))}
    completions = {}
    for prompt in SAMPLE_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, shipped.config)
        out = generate(shipped, [ids], steps=64, gen_length=64, block_length=32)
        completions[prompt] = decode_completion(tokenizer, out.completions()[0].tolist(), shipped.config.eos_token_id)
    card = {
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "config": shipped.config.to_dict(),
        "dtype": str(dtype).replace("torch.", ""),
        "size_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
        "training": summary,
        "evaluation": {name: r.to_dict() for name, r in results.items()}
        | {"shipped_vs_fp32": paired_difference(results["trained_fp32"], results["shipped"]).to_dict(),
           "windows": len(windows), "seq_len": windows.shape[1]},
        "samples_temperature_0": completions,
        "measured_on": {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                        "torch": torch.__version__},
        "pruning_2_4": _pruning_summary(compare_report) if compare_report else None,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "README.md").write_text(render_card(card))
    return card


def _pruning_summary(path: str | Path) -> list[dict]:
    report = json.loads(Path(path).read_text())
    return [{k: row[k] for k in ("pattern", "method", "calibration_seed", "nll", "vs_dense")}
            for row in report["rows"]]


def render_card(card: dict) -> str:
    ev, tr, cfg = card["evaluation"], card["training"], card["config"]
    lines = [
        "# sinkserve embedded model",
        "",
        "A small masked-diffusion language model with the LLaDA architecture, trained from scratch by",
        "`sinkprune train` on the offline documentation corpus (`sinkprune/data/CORPUS.md`). It exists so",
        "that every stage of the product runs on a real trained model on any CPU.",
        "",
        f"- Parameters: {card['parameters']:,} ({cfg['num_layers']} layers, d_model {cfg['hidden_size']}, "
        f"{cfg['num_heads']} heads, SwiGLU {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}); "
        f"weights in {card['dtype']}, {card['size_bytes'] / 1e6:.1f} MB on disk.",
        f"- Training: {tr['steps']} steps of {tr['train_config']['batch_size']} windows, "
        f"{tr['train_seconds'] / 60:.0f} minutes on {card['measured_on']['machine']} (2 cores, CPU), "
        f"lr {tr['train_config']['lr']}, bf16 autocast: {tr['train_config']['bf16']}.",
        "- Command: `sinkprune build-corpus && sinkprune train --bf16 --out-dir runs/train --steps "
        f"{tr['train_config']['steps']}` then `sinkprune ship --run runs/train --overwrite`.",
        "",
        f"## Evaluation (measured {card['measured_on']['date']}, torch {card['measured_on']['torch']})",
        "",
        f"Masked-diffusion NLL bound on {ev['windows']} held-out windows of {ev['seq_len']} tokens "
        f"(`estimate_nll`, {ev['shipped']['samples']} Monte-Carlo samples per window, seed 0, same masks for all):",
        "",
        "| model | NLL (nats/token) | perplexity |",
        "| --- | --- | --- |",
    ]
    for name in ("untrained", "trained_fp32", "shipped"):
        lines.append(f"| {name} | {ev[name]['nll']:.3f} ± {ev[name]['nll_stderr']:.3f} | {ev[name]['perplexity']:.1f} |")
    delta = ev["shipped_vs_fp32"]
    lines += ["", f"Shipping in {card['dtype']} costs {delta['delta_nll']:+.4f} ± {delta['delta_nll_stderr']:.4f} nats/token "
              "(paired).", "", "Eval-loss curve (step, training objective on held-out windows): "
              + ", ".join(f"{s}: {v}" for s, v in tr["eval_loss_curve"]), "", "## Samples (temperature 0, 64 steps, "
              "64 tokens, blocks of 32)", ""]
    for prompt, text in card["samples_temperature_0"].items():
        lines.append(f"- **{prompt}**{text}".replace("\n", " "))
    if card.get("pruning_2_4"):
        lines += ["", "## Pruning (from `sinkprune compare`)", "", "| pattern | method | seed | NLL | Δ vs dense |",
                  "| --- | --- | --- | --- | --- |"]
        for row in card["pruning_2_4"]:
            lines.append(f"| {row['pattern']} | {row['method']} | {row['calibration_seed']} | {row['nll']:.4f} | "
                         f"{row['vs_dense']['delta_nll']:+.4f} ± {row['vs_dense']['delta_nll_stderr']:.4f} |")
    return "\n".join(lines) + "\n"
