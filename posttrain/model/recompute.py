"""Activation checkpointing of a block, and a flag that says "this forward is a recompute".

A checkpointed block runs its forward twice: once normally, once during backward to rebuild
the activations. Side effects of the forward must happen once: the MoE layer's expert-load
counts (for the bias update) would otherwise be doubled. `recomputing()` is True only during
the second run.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

from torch.utils.checkpoint import checkpoint

_RECOMPUTING: ContextVar[bool] = ContextVar("posttrain_recomputing", default=False)


def recomputing() -> bool:
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recompute():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def checkpointed(fn, *args, **kwargs):
    """fn(*args, **kwargs) under non-reentrant activation checkpointing (recomputed in backward
    with `recomputing()` True)."""
    calls = [0]

    def run(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a, **k)
        with _recompute():
            return fn(*a, **k)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
