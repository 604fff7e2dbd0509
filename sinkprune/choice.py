"""Which pruning method `sinkprune prune` uses by default: the one the project's own
comparison measured best for the pattern.

`sinkprune compare` prunes with every method and calibration and scores each model
on the same evaluation masks as dense (`sinkprune.compare`). `choose` reads such a
report and, for each pattern, ranks every (method, calibration, sink weighting) by
its gap to dense averaged over the calibration draws; the lowest wins, and the
reason names its numbers, the runner-up's, the winner's paired differences
against the baselines the table paired it with, and the best configuration of
every other method. `DEFAULTS` is what `choose` gives on the comparisons of the
embedded model committed under `docs/embedded/` (a test keeps the two equal):
`sinkprune prune --method auto` (the default) takes it from there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sinkprune.masks import parse_pattern


@dataclass(frozen=True)
class Default:
    """The measured choice for one kind of pattern, with the numbers that made it."""

    method: str
    calibration: str
    measured_at: str | None = None  # the pattern the comparison ran; None: no comparison covers this kind
    source: str | None = None  # the committed report
    delta: float | None = None  # its mean gap to dense over the calibration draws, nats per token
    next_method: str | None = None  # the best configuration of any other method, and its gap
    next_delta: float | None = None

    def reason(self, pattern: str) -> str:
        if self.measured_at is None:
            return (f"auto: {self.method} ({self.calibration}); no comparison covers this kind of pattern "
                    f"(SparseGPT has no structured form): the structured benchmark's method")
        at = "" if pattern == self.measured_at else f", measured at {self.measured_at}"
        return (f"auto: {self.method} ({self.calibration}), the lowest NLL gap to dense in the project's "
                f"comparison on the embedded model ({self.source}{at}: {self.delta:+.4f} nats/token, mean of "
                f"two calibration draws; the best other method, {self.next_method}: {self.next_delta:+.4f})")


# kind of pattern -> the measured best (`choose` on the committed reports; tests/test_method_choice.py)
DEFAULTS = {
    "nm": Default("sink-sparsegpt", "noised", "2:4", "docs/embedded/compare", 0.0050, "sparsegpt (noised)", 0.0069),
    "unstructured": Default("sink-sparsegpt", "noised", "unstructured:0.5", "docs/embedded/compare_unstructured",
                            0.0018, "sparsegpt (noised)", 0.0023),
    "structured": Default("sink-wanda", "clean"),
}


def default_method(pattern: str) -> tuple[str, str, str]:
    """(method, calibration, reason) that `--method auto` uses for `pattern` (ValueError if it does not parse)."""
    choice = DEFAULTS[parse_pattern(pattern).kind]
    return choice.method, choice.calibration, choice.reason(pattern)


@dataclass
class Choice:
    """The best configuration of one pattern in a comparison report, and why."""

    pattern: str
    method: str
    calibration: str
    sink_weighting: str
    delta: float  # mean over draws of the gap to dense, nats per token
    draws: list[dict]  # per draw: calibration_seed, delta_nll, delta_nll_stderr
    runner_up: dict | None  # the second configuration overall: label, delta
    paired: list[dict]  # the winner against each baseline the table paired it with: baseline, draws
    other_methods: list[dict]  # the best configuration of every other method: label, delta (best first)

    def label(self) -> str:
        return _label((self.method, self.calibration, self.sink_weighting))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        text = (f"{self.pattern}: {self.label()}: {self.delta:+.4f} nats/token against dense "
                f"(mean of {len(self.draws)} draw{'s' if len(self.draws) > 1 else ''}: {_values(self.draws)})")
        if self.runner_up is None:
            return text + "; the only configuration run"
        text += f"; runner-up {self.runner_up['label']} {self.runner_up['delta']:+.4f}"
        for pair in self.paired:
            text += f"; paired against {pair['baseline']} on the same masks {_values(pair['draws'])}"
        if self.other_methods:
            text += "; best of each other method: " + ", ".join(
                f"{other['label']} {other['delta']:+.4f}" for other in self.other_methods)
        return text


def _values(draws: list[dict]) -> str:
    return ", ".join(f"{d['delta_nll']:+.4f} ± {d['delta_nll_stderr']:.4f}" for d in draws)


def _key(row: dict) -> tuple[str, str, str]:
    return row["method"], row["calibration"], row["sink_weighting"]


def _label(key: tuple[str, str, str]) -> str:
    """`sink-sparsegpt (noised)`, `sink-wanda (per-timestep, noised)`, `magnitude`."""
    method, calibration, weighting = key
    details = [weighting] * (weighting == "per-timestep") + [calibration] * (calibration != "-")
    return f"{method} ({', '.join(details)})" if details else method


def _paired(rows: list[dict], winner: tuple) -> list[dict]:
    """The winner against each baseline the table paired it with (a sink-aware row against
    its plain method, calibrated the same way and on clean windows), per draw."""
    pairs: dict[tuple, list[dict]] = {}
    for row in rows:
        if _key(row) != winner:
            continue
        for entry in (row.get("vs_baseline"), row.get("vs_reference_baseline")):
            if entry:
                pairs.setdefault((entry["baseline"], entry["calibration"], "-"), []).append(
                    {"calibration_seed": row["calibration_seed"], "delta_nll": entry["delta_nll"],
                     "delta_nll_stderr": entry["delta_nll_stderr"]})
    return [{"baseline": _label(key), "draws": draws} for key, draws in pairs.items()]


def choose(report: dict) -> dict[str, Choice]:
    """Per pattern in `report` (`sinkprune compare`'s), the configuration with the lowest
    mean gap to dense over its calibration draws."""
    choices: dict[str, Choice] = {}
    for pattern in dict.fromkeys(row["pattern"] for row in report["rows"]):
        rows = [row for row in report["rows"] if row["pattern"] == pattern]
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(_key(row), []).append(row)
        mean = {key: sum(r["vs_dense"]["delta_nll"] for r in group) / len(group) for key, group in groups.items()}
        ranked = sorted(groups, key=mean.__getitem__)
        best = ranked[0]
        others: dict[str, tuple] = {}  # best configuration of each other method
        for key in ranked[1:]:
            if key[0] != best[0]:
                others.setdefault(key[0], key)
        choices[pattern] = Choice(
            pattern, *best, mean[best],
            [{"calibration_seed": r["calibration_seed"], "delta_nll": r["vs_dense"]["delta_nll"],
              "delta_nll_stderr": r["vs_dense"]["delta_nll_stderr"]} for r in groups[best]],
            {"label": _label(ranked[1]), "delta": mean[ranked[1]]} if len(ranked) > 1 else None,
            _paired(rows, best),
            [{"label": _label(key), "delta": mean[key]} for key in others.values()])
    return choices
