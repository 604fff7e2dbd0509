"""Online quality: paired checks of the candidate against the reference on live requests.

For a sampled user request, after its answer has gone back to the client, the same
request (same seed) runs on the other variant, then the reference replica (dense)
scores both answers with the model it already holds: the gap between its NLL of the
candidate's answer and of its own answer (nats per token; LLaDA's Monte-Carlo
estimator with the same masks for both, so the difference is paired) says how much
less likely the pruned answer is under the dense model. Token agreement is the share
of positions where the two answers hold the same token.

A check never delays or fails a user request: it starts after the answer, at most
`max_in_flight` run at once, and a replica busier than `max_busy` refuses its part.
Every check ends in one counted outcome: scored, dropped_busy or failed.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable

from serve.decisions.router_config import QualitySettings

log = logging.getLogger("ray.serve")
SCORED, DROPPED_BUSY, FAILED = "scored", "dropped_busy", "failed"


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (over the longer answer) holding the same token in both."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else sum(x == y for x, y in zip(a, b)) / longest


@dataclass(frozen=True)
class PairResult:
    candidate: str  # the variant judged against the reference
    outcome: str
    gap: float | None = None  # NLL(candidate's answer) - NLL(reference's answer), nats per token
    agreement: float | None = None
    copied_to: str | None = None  # the variant that ran the copy, if it ran


def _answer(output: dict) -> dict:
    return {"token_ids": output["token_ids"], "finish_reason": output["finish_reason"]}


class QualityChecker:
    """Samples user requests and runs their paired checks in the background.

    `replicas` runs the copy and the scoring (`shadow`, `score`: `serve.decisions.decider.Replicas`);
    `on_result(PairResult)` records each outcome (metrics, the canary's evidence)."""

    def __init__(self, variants: list[str], replicas, on_result: Callable[[PairResult], None],
                 rng: random.Random | None = None):
        self.variants, self.replicas, self.on_result = list(variants), replicas, on_result
        self.rng = rng or random.Random()
        self.settings, self.rate, self.candidate = QualitySettings(), 0.0, None
        self.tasks: set[asyncio.Task] = set()

    def configure(self, settings: QualitySettings, rate: float, candidate: str | None) -> None:
        """`candidate`: the variant checked against `settings.reference` (None: the other one)."""
        others = sorted(v for v in self.variants if v != settings.reference)
        self.settings, self.rate = settings, rate if settings.reference in self.variants and others else 0.0
        self.candidate = candidate or (others[0] if others else None)

    def maybe_check(self, served_by: str, payload: dict, output: dict) -> bool:
        """Start a check of this answered request if it is sampled; True if started or dropped.
        Never raises: the user's request is already answered and must stay so."""
        try:
            return self._start(served_by, payload, output)
        except Exception:
            log.exception("could not start a quality check")
            return False

    def _start(self, served_by: str, payload: dict, output: dict) -> bool:
        reference, candidate = self.settings.reference, self.candidate
        if served_by not in (reference, candidate) or self.rate <= 0 or self.rng.random() >= self.rate:
            return False
        if len(self.tasks) >= self.settings.max_in_flight:
            self.on_result(PairResult(candidate, DROPPED_BUSY))
            return True
        task = asyncio.get_running_loop().create_task(self._check(served_by, payload, output))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _check(self, served_by: str, payload: dict, output: dict) -> None:
        reference, candidate = self.settings.reference, self.candidate
        other = candidate if served_by == reference else reference
        try:
            result = await self._pair(served_by, other, {**payload, "seed": output["seed"]}, output)
        except Exception as err:  # a dead replica or a bug: this check is lost, never the user's request
            log.warning("quality check %s vs %s failed: %r", candidate, reference, err)
            result = PairResult(candidate, FAILED)
        self.on_result(result)

    async def _pair(self, served_by: str, other: str, payload: dict, output: dict) -> PairResult:
        settings, candidate = self.settings, self.candidate
        copy = await self.replicas.shadow(other, payload, settings.max_busy)
        if copy["type"] == "dropped":
            return PairResult(candidate, DROPPED_BUSY)
        if copy["type"] != "finished":
            return PairResult(candidate, FAILED, copied_to=other)
        copied = {"copied_to": other}
        answers = {served_by: output, other: copy["output"]}
        ref, cand = answers[settings.reference], answers[candidate]
        agreement = token_agreement(ref["token_ids"], cand["token_ids"])
        scores = await self.replicas.score(
            settings.reference, payload, [_answer(ref), _answer(cand)], settings.samples, output["seed"], settings.max_busy)
        if scores["type"] == "dropped":
            return PairResult(candidate, DROPPED_BUSY, agreement=agreement, **copied)
        if scores["type"] != "scored":
            return PairResult(candidate, FAILED, agreement=agreement, **copied)
        ref_nll, cand_nll = scores["nll"]
        return PairResult(candidate, SCORED, cand_nll - ref_nll, agreement, **copied)
