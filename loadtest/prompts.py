"""Prompts for load tests: slices of the shipped evaluation text (held out from
training and calibration), or lines of a user's file."""
from __future__ import annotations

import random
from pathlib import Path


def load_prompts(count: int, prompt_words: int, path: str | None = None, seed: int = 0) -> list[str]:
    """`count` prompts of about `prompt_words` words each, deterministic for a seed."""
    if path:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {path} has no non-empty line")
        return [lines[i % len(lines)] for i in range(count)]
    from sinkprune.data.corpus import load_split

    words = " ".join(load_split("evaluation")).split()
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(words) - prompt_words) for _ in range(count)]
    return [" ".join(words[s:s + prompt_words]) for s in starts]
