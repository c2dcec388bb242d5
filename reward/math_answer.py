"""Final-answer extraction: last \\boxed{}, GSM8K's `#### N`, or "the answer is ...".

Pure string work, safe to run anywhere; the symbolic comparison happens in math_verify_worker.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_SPACE = re.compile(r"\\boxed\s+([^\s$]+)")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s*$|\.\s+[A-Z\n]|\n|$)",
                        re.IGNORECASE)
_NUMBER_WITH_COMMAS = re.compile(r"^-?\$?\d{1,3}(,\d{3})+(\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or of `\\boxed 5`."""
    best = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = (m.start(), text[m.end():i - 1])
    spaced = list(_BOXED_SPACE.finditer(text))
    if spaced and (best is None or spaced[-1].start() > best[0]):
        return spaced[-1].group(1)
    return best[1] if best else None


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer string, how it was found: "boxed" | "####" | "answer_is" | "none")."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip(), "####"
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().strip("$ ").rstrip("."), "answer_is"
    return None, "none"


def normalize_gold(gold: str) -> str:
    """Gold answers as datasets write them; "1,234" is a number, not a tuple."""
    gold = str(gold).strip()
    if _NUMBER_WITH_COMMAS.match(gold):
        gold = gold.replace(",", "")
    return gold


def gsm8k_gold(answer_field: str) -> str:
    """The number after `####` in a GSM8K `answer` field."""
    found = _HASHES.findall(answer_field)
    if not found:
        raise ValueError("GSM8K answer field without '#### N'")
    return normalize_gold(found[-1])
