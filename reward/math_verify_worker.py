"""Runs inside DeadlinePool workers: math-verify parse + verify of one (gold, answer) pair.

Kept import-light for the parent: only workers import math_verify.
"""

from __future__ import annotations


def warmup() -> None:
    """Import and exercise math-verify once, so a worker's first real item is not slow.

    Its timeout messages echo the whole (possibly adversarial, megabyte-long) input to the
    log; the caller gets the outcome instead, so they are silenced here.
    """
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    verify_pair(("1", "1", 2))


def _parse(text: str, timeout: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # The extracted answer is wrapped in \boxed{} so math-verify reads it as the final answer.
    return parse("\\boxed{" + text + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout)


def verify_pair(item: tuple[str, str, int]) -> dict:
    """item = (gold, answer, per-operation timeout in whole seconds). Gold goes first:
    math-verify's comparison is not symmetric."""
    from math_verify import verify

    gold, answer, timeout = item
    gold_parsed = _parse(gold, timeout)
    if not gold_parsed:
        return {"correct": None, "reason": "gold answer could not be parsed"}
    answer_parsed = _parse(answer, timeout)
    if not answer_parsed:
        return {"correct": False, "reason": "answer could not be parsed"}
    ok = bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))
    if ok:  # math-verify's numeric check cannot tell values apart below its resolution
        from .math_exact import exact_disagreement

        why = exact_disagreement(gold_parsed[0], answer_parsed[0])
        if why:
            return {"correct": False, "reason": f"mismatch: {why}"}
    return {"correct": ok, "reason": "match" if ok else "mismatch"}
