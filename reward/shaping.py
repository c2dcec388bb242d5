"""Format and shaping rewards, all with TRL's signature.

* ThinkFormat: R1's format: one closed <think>...</think> followed by a non-empty answer.
* OverlongPenalty: DAPO's soft over-long punishment (0 up to L_max - L_cache, then linear
  down to -1 at L_max, -1 beyond).
* RepetitionPenalty: -max_penalty * (share of repeated word n-grams).
* LanguageConsistency: share of the reasoning's words written in the target language's
  script, as R1's language-consistency reward.
* CosineLength: correctness-dependent cosine schedule over length (short correct answers
  rewarded most, long wrong answers punished least).

Lengths are token counts when TRL passes `completion_ids` (or a tokenizer is given), else
characters.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .text import column, completion_text, split_think, words

_THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


def _lengths(completions, columns: dict, tokenizer=None) -> list[int]:
    ids = columns.get("completion_ids")
    if ids is not None:
        return [len(x) for x in ids]
    texts = [completion_text(c) for c in completions]
    if tokenizer is not None:
        return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [len(t) for t in texts]


class ThinkFormat:
    """1.0 for `<think>reasoning</think>answer` with exactly one think block and a non-empty
    answer, else 0.0. `opened_by_prompt`: the chat template already wrote `<think>` (R1's
    template does), so the completion starts inside the block."""

    def __init__(self, opened_by_prompt: bool = False):
        self.__name__ = "format"
        self.opened_by_prompt = opened_by_prompt

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        out = []
        for c in completions:
            text = completion_text(c)
            if self.opened_by_prompt:
                text = "<think>" + text
            m = _THINK.match(text)
            ok = bool(m) and "<think>" not in m.group(1) and "</think>" not in m.group(2) \
                and bool(m.group(1).strip()) and bool(m.group(2).strip())
            out.append(1.0 if ok else 0.0)
        return out


class OverlongPenalty:
    """DAPO soft over-long punishment; lengths in tokens (see module docstring)."""

    def __init__(self, max_length: int = 4096, cache_length: int = 512, tokenizer=None):
        if not 0 < cache_length <= max_length:
            raise ValueError("need 0 < cache_length <= max_length")
        self.__name__ = "overlong"
        self.max_length, self.cache_length, self.tokenizer = max_length, cache_length, tokenizer

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        soft = self.max_length - self.cache_length
        out = []
        for n in _lengths(completions, columns, self.tokenizer):
            if n <= soft:
                out.append(0.0)
            elif n <= self.max_length:
                out.append((soft - n) / self.cache_length)
            else:
                out.append(-1.0)
        return out


class RepetitionPenalty:
    """-max_penalty * (1 - distinct n-grams / n-grams) over words; 0 for texts shorter than n."""

    def __init__(self, ngram: int = 3, max_penalty: float = 1.0):
        self.__name__ = "repetition"
        self.ngram, self.max_penalty = ngram, max_penalty

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        out = []
        for c in completions:
            w = [x.lower() for x in words(completion_text(c))]
            grams = [tuple(w[i:i + self.ngram]) for i in range(len(w) - self.ngram + 1)]
            repeated = (1 - len(set(grams)) / len(grams)) if grams else 0.0
            out.append(-self.max_penalty * repeated if repeated else 0.0)
        return out


_SCRIPT_OF_LANGUAGE = {"en": "LATIN", "fr": "LATIN", "de": "LATIN", "es": "LATIN", "zh": "CJK",
                       "ja": "CJK", "ru": "CYRILLIC", "ar": "ARABIC", "ko": "HANGUL", "el": "GREEK"}


def char_script(ch: str) -> str | None:
    """The script of a letter (LATIN, CJK, CYRILLIC, ...), None for digits, punctuation, space."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA")):
        return "CJK"
    return name.split(" ")[0] if name else None


def script_share(text: str, script: str) -> float | None:
    """Share of words (with letters) whose letters are mostly in `script`; None with no words."""
    counted = hits = 0
    for w in words(text):
        scripts = [s for s in (char_script(ch) for ch in w) if s]
        if not scripts:
            continue
        # CJK text has no spaces: weigh a run of ideographs by its characters
        weight = len(scripts) if scripts[0] == "CJK" else 1
        counted += weight
        if scripts.count(script) * 2 > len(scripts):
            hits += weight
    return hits / counted if counted else None


class LanguageConsistency:
    """Share of the reasoning (inside <think>, else the whole text) in the target language's
    script; the target comes from `language` (a column or the constructor), default English."""

    def __init__(self, language: str = "en"):
        self.__name__ = "language"
        self.language = language

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        langs = column(columns, "language", len(completions))
        out = []
        for c, lang in zip(completions, langs):
            lang = (lang or self.language).lower()
            script = _SCRIPT_OF_LANGUAGE.get(lang)
            if script is None:
                raise ValueError(f"no script known for language {lang!r}; known: {sorted(_SCRIPT_OF_LANGUAGE)}")
            reasoning, answer = split_think(completion_text(c))
            share = script_share(reasoning if reasoning is not None else answer, script)
            out.append(share if share is not None else None)
        return out


class CosineLength:
    """Cosine length scaling of a correctness reward (by default the math reward).

    correct: from max_correct at length 0 down to min_correct at max_length;
    wrong: from min_wrong at length 0 up to max_wrong at max_length (long attempts at a
    wrong answer are punished less than short guesses). Beyond max_length: the end values.
    """

    def __init__(self, correctness=None, max_length: int = 4096, min_correct: float = 0.5, max_correct: float = 1.0,
                 min_wrong: float = -1.0, max_wrong: float = -0.5, tokenizer=None):
        from .math_reward import MathReward

        self.__name__ = "cosine"
        self.correctness = correctness or MathReward()
        self.max_length, self.tokenizer = max_length, tokenizer
        self.correct_range, self.wrong_range = (min_correct, max_correct), (max_wrong, min_wrong)

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        scores = self.correctness(prompts, completions, **columns)
        out = []
        for s, n in zip(scores, _lengths(completions, columns, self.tokenizer)):
            if s is None:
                out.append(None)
                continue
            lo, hi = self.correct_range if s >= 1.0 else self.wrong_range
            progress = min(n, self.max_length) / self.max_length
            out.append(lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * progress)))
        return out
