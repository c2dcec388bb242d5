"""Rewards by name, so configs can say `rewards: {math: 1.0, format: 0.1}`.

`get(name, **options)` builds the reward; `register(name, factory)` adds one (any callable
with TRL's signature, e.g. an open-r1 reward function, via `register("x", lambda: fn)`);
`combine({...})` makes the weighted sum of several, itself a reward with the same signature.
A name of the form `package.module:function` imports that function (TRL's signature) without
registering it, so a config can use a reward from the user's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list]
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str, factory: Callable[..., RewardFn]) -> None:
    if name in _FACTORIES:
        raise ValueError(f"a reward named {name!r} is already registered")
    _FACTORIES[name] = factory


def available() -> list[str]:
    return sorted(_FACTORIES)


def _imported(spec: str, options: dict) -> RewardFn:
    import importlib

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e})") from None
    if options:  # a factory: called with the options to build the reward
        fn = fn(**options)
    return fn


def get(name: str, **options: Any) -> RewardFn:
    if ":" in name and name not in _FACTORIES:
        fn = _imported(name, options)
        if not hasattr(fn, "__name__"):
            fn.__name__ = name
        return fn
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available())} "
                       "(or module:function for your own)") from None
    fn = factory(**options)
    if not hasattr(fn, "__name__"):
        fn.__name__ = name  # TRL logs rewards by __name__
    return fn


def combine(weights: dict[str, float] | dict[RewardFn, float], **options: Any) -> RewardFn:
    """Weighted sum. A reward's None (not applicable) leaves it out of that sample's sum; a
    sample where every reward is None scores None."""
    parts = [(get(k, **options.get(k, {})) if isinstance(k, str) else k, float(w)) for k, w in weights.items()]

    def combined(prompts=None, completions=None, **columns):
        total: list[float | None] = [None] * len(completions)
        for fn, w in parts:
            for i, v in enumerate(fn(prompts, completions, **columns)):
                if v is not None:
                    total[i] = (total[i] or 0.0) + w * v
        return total

    combined.__name__ = "+".join(getattr(fn, "__name__", "reward") for fn, _ in parts)
    return combined
