"""Quality of one or more models on the same held-out windows, with paired deltas."""
from __future__ import annotations

from sinkprune.data.corpus import load_split, load_text_files
from sinkprune.data.windows import make_windows, token_stream
from sinkprune.dlm.likelihood import LikelihoodResult, estimate_nll, paired_difference


def text_windows(tokenizer, split: str = "evaluation", count: int | None = 64, seq_len: int = 256, files=None):
    """BOS-led windows from a shipped split (or local text files)."""
    documents = load_text_files(files) if files else load_split(split)
    return make_windows(token_stream(documents, tokenizer), seq_len, tokenizer.bos_token_id, count)


def compare_models(models: dict, windows, samples: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """NLL of every model on identical masks; each model after the first also gets
    its paired difference to the first (the baseline)."""
    return paired_report({name: estimate_nll(model, windows, samples=samples, seed=seed, progress=progress)
                          for name, model in models.items()})


def paired_report(results: dict[str, LikelihoodResult]) -> dict:
    """Each result as a dict; every one after the first with its paired difference to
    the first. The results may come from one model at different times (dense, then
    the same model pruned in place), so no second copy of the weights is needed."""
    baseline_name = next(iter(results))
    report = {}
    for name, result in results.items():
        entry = result.to_dict()
        if name != baseline_name:
            entry["vs_" + baseline_name] = paired_difference(results[baseline_name], result).to_dict()
        report[name] = entry
    return report
