"""Offline "embedded default": a synthetic checkable task and a locally built tokenizer.

Everything here runs without network access and is deterministic in its
arguments, so the whole pipeline can be exercised (and tested) on a laptop.
"""

from .task import ArithmeticProblem, make_problems
from .tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    build_tokenizer,
    save_tokenizer,
)

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "EOS",
    "PAD",
    "THINK_CLOSE",
    "THINK_OPEN",
    "USER",
    "ArithmeticProblem",
    "build_tokenizer",
    "make_problems",
    "save_tokenizer",
]
