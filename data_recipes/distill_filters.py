"""Filters for R1-style distillation data: correct, complete and readable, as the report keeps.

`filter_records(records, config)` returns (kept, rejects); each reject carries the first
reason it failed, in this order:
  per sample   truncated, unclosed_think / no_think_block, no_final_answer, too_short, too_long, repetitive,
               language_mixing, too_few_reflections, wrong_answer / tests_failed, contaminated
  per prompt   pass_rate_out_of_range (the share of the prompt's samples that verified)
  across set   duplicate (exact), near_duplicate (MinHash), rejection_sampling_surplus
               (more correct samples than keep_per_prompt; the shortest are kept)
Kept records gain `verification` {score, reason}, `reflection_markers` and `pass_rate`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from reward.code_reward import extract_code
from reward.math_answer import extract_answer
from reward.shaping import _SCRIPT_OF_LANGUAGE, script_share
from reward.text import split_think

from posttrain.config import setting

from .decontaminate import Decontaminator
from .dedup import exact_key, near_duplicates

REFLECTION = re.compile(
    r"\b(wait|hmm|let me (?:verify|check|double-check|recheck|recompute|redo|re-examine|reconsider)|"
    r"double-check|verify|verifying|re-examine|on second thought|that's not right|mistake)\b", re.IGNORECASE)


@dataclass
class FilterConfig:
    require_stop: bool = True             # drop samples cut by the token limit
    require_think: bool = True            # a closed <think>...</think> block
    require_answer: bool = True           # a final answer (math) / a code block (code)
    min_chars: int = setting(1, ge=0)
    max_chars: int | None = setting(None, ge=1)
    max_tokens: int | None = setting(None, ge=1)
    max_repetition: float = setting(0.3, ge=0, le=1)   # share of repeated word 4-grams allowed
    language: str = setting("en", choices=tuple(sorted(_SCRIPT_OF_LANGUAGE)))
    min_language_share: float = setting(0.95, ge=0, le=1)  # share of reasoning words in the language's script
    min_reflections: int = setting(0, ge=0)
    verify: bool = True
    min_pass_rate: float = setting(0.0, ge=0, le=1)
    max_pass_rate: float = setting(1.0, ge=0, le=1)
    keep_per_prompt: int | None = setting(None, ge=1)  # best-k correct per prompt (rejection sampling)
    dedup: bool = True
    near_dup_threshold: float | None = setting(0.9, gt=0, le=1)
    decontaminate: list[str] = field(default_factory=list)  # benchmark recipes or jsonl files
    ngram: int = setting(13, ge=1)
    allow_weak_isolation: bool = False    # code: judge in a weakly isolated sandbox (reward/sandbox.py)

    def __post_init__(self):
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError(f"min_pass_rate={self.min_pass_rate} is above max_pass_rate={self.max_pass_rate}")


def reflection_count(text: str) -> int:
    reasoning, answer = split_think(text)
    return len(REFLECTION.findall(reasoning if reasoning is not None else answer))


def repetition_share(text: str, n: int = 4) -> float:
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _sample_reason(rec: dict, cfg: FilterConfig) -> str | None:
    text = rec["completion"]
    if cfg.require_stop and rec.get("finish_reason") != "stop":
        return "truncated"
    reasoning, answer = split_think(text)
    # the opening tag may sit in the prompt (R1's template ends with it): the close decides
    if cfg.require_think and "</think>" not in text:
        return "unclosed_think" if "<think>" in text else "no_think_block"
    if cfg.require_answer:
        if rec.get("task") == "math" and extract_answer(answer)[0] is None:
            return "no_final_answer"
        if rec.get("task") == "code" and extract_code(text) is None:
            return "no_final_answer"
        if rec.get("task") not in ("math", "code") and not answer.strip():
            return "no_final_answer"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_tokens is not None and rec.get("completion_tokens", 0) > cfg.max_tokens:
        return "too_long"
    if repetition_share(text) > cfg.max_repetition:
        return "repetitive"
    share = script_share(reasoning if reasoning is not None else text, _SCRIPT_OF_LANGUAGE[cfg.language])
    if share is not None and share < cfg.min_language_share:
        return "language_mixing"
    if reflection_count(text) < cfg.min_reflections:
        return "too_few_reflections"
    return None


def _verify(records: list[dict], allow_weak_isolation: bool = False) -> list[tuple[float | None, str]]:
    """(score, reason) per record, with the reward that fits its task; None = no verifier."""
    import reward

    out: list[tuple[float | None, str]] = [(None, "no verifier for this task")] * len(records)
    for task, name in (("math", "math"), ("code", "code")):
        idx = [i for i, r in enumerate(records) if r.get("task") == task]
        if not idx:
            continue
        batch = [records[i] for i in idx]
        columns = {k: [r.get(k) for r in batch] for k in ("answer", "test", "entry_point", "code_prompt")}
        options = {"allow_weak_isolation": True} if task == "code" and allow_weak_isolation else {}
        explained = reward.get(name, **options).explain(prompts=None, completions=[r["completion"] for r in batch],
                                                        **columns)
        for i, pair in zip(idx, explained):
            out[i] = pair
    return out


def filter_records(records: list[dict], cfg: FilterConfig) -> tuple[list[dict], list[dict], dict]:
    """(kept, rejects with `reject_reason`, per-prompt pass rates)."""
    if cfg.language not in _SCRIPT_OF_LANGUAGE:
        raise ValueError(f"unknown language {cfg.language!r}; known: {sorted(_SCRIPT_OF_LANGUAGE)}")
    rejects: list[dict] = []

    def reject(rec: dict, why: str) -> None:
        rejects.append({**rec, "reject_reason": why})

    verdicts = _verify(records, cfg.allow_weak_isolation) if cfg.verify else [(None, "not verified")] * len(records)
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for rec, (score, _) in zip(records, verdicts):
        if score is not None:
            by_prompt[rec["prompt_id"]].append(1.0 if score == 1.0 else 0.0)
    pass_rate = {pid: sum(v) / len(v) for pid, v in by_prompt.items()}
    decon = Decontaminator(cfg.decontaminate, cfg.ngram) if cfg.decontaminate else None

    survivors: list[dict] = []
    for rec, (score, why) in zip(records, verdicts):
        rec = {**rec, "verification": {"score": score, "reason": why},
               "reflection_markers": reflection_count(rec["completion"]),
               "pass_rate": pass_rate.get(rec["prompt_id"])}
        reason = _sample_reason(rec, cfg)
        if reason is None and score is not None and score < 1.0:
            reason = "tests_failed" if rec.get("task") == "code" else "wrong_answer"
        if reason is None and decon is not None and decon.contaminated(rec["problem"]):
            reason = "contaminated"
        if reason is None and rec["pass_rate"] is not None and not (
                cfg.min_pass_rate <= rec["pass_rate"] <= cfg.max_pass_rate):
            reason = "pass_rate_out_of_range"
        if reason:
            reject(rec, reason)
        else:
            survivors.append(rec)

    if cfg.dedup:
        seen, unique = set(), []
        for rec in survivors:
            key = exact_key(rec["completion"])
            if key in seen:
                reject(rec, "duplicate")
            else:
                seen.add(key)
                unique.append(rec)
        survivors = unique
        if cfg.near_dup_threshold is not None and len(survivors) > 1:
            dup_of = near_duplicates([r["completion"] for r in survivors], cfg.near_dup_threshold)
            for i in sorted(dup_of):
                reject(survivors[i], "near_duplicate")
            survivors = [r for i, r in enumerate(survivors) if i not in dup_of]

    if cfg.keep_per_prompt is not None:
        groups: dict[str, list[dict]] = defaultdict(list)
        for rec in survivors:
            groups[rec["prompt_id"]].append(rec)
        keep_ids = set()
        for group in groups.values():
            ranked = sorted(group, key=lambda r: (r.get("completion_tokens", 0), r["sample_idx"]))
            keep_ids.update(r["id"] for r in ranked[: cfg.keep_per_prompt])
        for rec in survivors:
            if rec["id"] not in keep_ids:
                reject(rec, "rejection_sampling_surplus")
        survivors = [r for r in survivors if r["id"] in keep_ids]
    return survivors, rejects, pass_rate
