"""N-gram decontamination against benchmark problems.

A training problem is contaminated when it shares any word n-gram (13 by default, the size
GPT-3's decontamination used) with a benchmark problem, after lower-casing and dropping
punctuation. Benchmark texts shorter than n words are matched whole instead, so a short
benchmark question copied verbatim is still caught.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .dedup import normalize

_TEXT_FIELDS = ("problem", "question", "prompt", "text")


def benchmark_texts(source: str) -> list[str]:
    """Problems of a benchmark: a built-in recipe name or a jsonl(.gz) file."""
    from .prompt_sets import RECIPES, load_prompts

    if source in RECIPES:
        records, _ = load_prompts(source)
        return [r.problem for r in records]
    path = Path(source)
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            field = next((k for k in _TEXT_FIELDS if isinstance(rec, dict) and isinstance(rec.get(k), str)), None)
            if field:
                texts.append(rec[field])
    if not texts:
        raise ValueError(f"{source}: no problem texts found (looked for fields {', '.join(_TEXT_FIELDS)})")
    return texts


class Decontaminator:
    def __init__(self, benchmarks: list[str], n: int = 13):
        self.n = n
        self.grams: set[str] = set()
        self.whole: set[str] = set()
        self.sources = list(benchmarks)
        for source in benchmarks:
            for text in benchmark_texts(source):
                words = normalize(text).split()
                if len(words) < n:
                    self.whole.add(" ".join(words))
                else:
                    self.grams.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))

    def contaminated(self, text: str) -> bool:
        words = normalize(text).split()
        padded = " " + " ".join(words) + " "
        if any(f" {w} " in padded for w in self.whole if w):  # a short benchmark text inside this one
            return True
        return any(" ".join(words[i:i + self.n]) in self.grams for i in range(len(words) - self.n + 1))
