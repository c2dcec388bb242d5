"""Math answer reward: the final answer of a completion against the gold `answer` column.

Extraction (reward/math_answer.py) takes the last \\boxed{}, else GSM8K's `#### N`, else
"the answer is ...", from the text after `</think>` when `ignore_think` (an unclosed think
block then means no answer). The comparison is math-verify's, gold first (it is not
symmetric), run in DeadlinePool workers so that it is bounded in time from any thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .deadline_pool import DeadlinePool, shared_pool
from .math_answer import extract_answer, normalize_gold
from .text import column, completion_text, split_think

_VERIFY = "reward.math_verify_worker:verify_pair"
_WARMUP = "reward.math_verify_worker:warmup"


@dataclass
class MathResult:
    score: float | None     # 1.0 correct, 0.0 wrong / no answer / timed out, None without a gold answer
    answer: str | None      # what was extracted
    found_by: str           # "boxed" | "####" | "answer_is" | "none"
    reason: str             # "match", "mismatch", "no final answer", "timed out after 5s", ...


class MathReward:
    """TRL-signature reward: `fn(prompts, completions, answer=[...], **columns) -> list[float | None]`."""

    def __init__(self, ignore_think: bool = True, deadline_s: float = 5.0, workers: int | None = None,
                 pool: DeadlinePool | None = None):
        self.__name__ = "math"
        self.ignore_think = ignore_think
        self.deadline_s = deadline_s
        self._pool, self._workers = pool, workers

    @property
    def pool(self) -> DeadlinePool:
        if self._pool is None:
            self._pool = shared_pool(_VERIFY, _WARMUP, self._workers, self.deadline_s)
        return self._pool

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        return [r.score for r in self.score_detailed(completions, column(columns, "answer", len(completions)))]

    def explain(self, prompts=None, completions=None, **columns) -> list[tuple[float | None, str]]:
        """(score, reason) per completion, for reports and rejects files."""
        results = self.score_detailed(completions, column(columns, "answer", len(completions)))
        return [(r.score, r.reason) for r in results]

    def score_detailed(self, completions: list, answers: list) -> list[MathResult]:
        results: list[MathResult | None] = [None] * len(completions)
        jobs: list[tuple[int, tuple[str, str, int]]] = []
        inner_timeout = max(1, math.ceil(self.deadline_s / 2))  # math-verify's own alarm, inside the deadline
        for i, (completion, gold) in enumerate(zip(completions, answers)):
            if gold is None or str(gold).strip() == "":
                results[i] = MathResult(None, None, "none", "no gold answer")
                continue
            text = completion_text(completion)
            if self.ignore_think:
                reasoning, text = split_think(text)
                if reasoning is not None and not text.strip():
                    results[i] = MathResult(0.0, None, "none", "think block not closed: no final answer")
                    continue
            answer, found_by = extract_answer(text)
            if answer is None:
                results[i] = MathResult(0.0, None, "none", "no final answer")
                continue
            gold_s = normalize_gold(gold)
            if normalize_gold(answer) == gold_s:
                results[i] = MathResult(1.0, answer, found_by, "match")
                continue
            results[i] = MathResult(0.0, answer, found_by, "")  # filled in below
            jobs.append((i, (gold_s, normalize_gold(answer), inner_timeout)))
        if jobs:
            outcomes = self.pool.map([item for _, item in jobs], self.deadline_s)
            for (i, _), out in zip(jobs, outcomes):
                r = results[i]
                if out.ok and out.value["correct"] is None:
                    r.score, r.reason = None, out.value["reason"]
                elif out.ok:
                    r.score, r.reason = (1.0 if out.value["correct"] else 0.0), out.value["reason"]
                else:
                    r.score, r.reason = 0.0, out.error or "verification failed"
        return results  # type: ignore[return-value]
