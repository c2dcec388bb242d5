"""Turning what a reward receives into text: plain strings or chat-message lists (TRL's two forms)."""

from __future__ import annotations

import re
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def completion_text(completion: Any) -> str:
    """A completion as text: the string itself, or the assistant content of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        parts = [m.get("content", "") for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "".join(str(p) for p in parts if p)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def prompt_text(prompt: Any) -> str:
    """The last user turn of a chat prompt, or the prompt string."""
    if prompt is None or isinstance(prompt, str):
        return prompt or ""
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning inside <think>...</think> or None, the text after it).

    A think block that is opened but never closed leaves no answer part: everything is
    reasoning that did not finish. Text without a think block is all answer.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        start = text.find(THINK_OPEN)
        reasoning = text[start + len(THINK_OPEN) if 0 <= start < close else 0:close]
        return reasoning, text[close + len(THINK_CLOSE):]
    if THINK_OPEN in text:
        return text[text.find(THINK_OPEN) + len(THINK_OPEN):], ""
    return None, text


def column(columns: dict, name: str, n: int) -> list:
    """A per-sample column from TRL's **kwargs, checked for length (None-filled if absent)."""
    values = columns.get(name)
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"column {name!r} must be a list with one value per completion")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


_WS = re.compile(r"\s+")


def words(text: str) -> list[str]:
    return [w for w in _WS.split(text) if w]
