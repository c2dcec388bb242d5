"""Rewards by name, so configs can say `rewards: {math: 1.0, format: 0.1}`.

`get(name, **options)` builds the reward; `register(name, factory)` adds one (any callable
with TRL's signature, e.g. an open-r1 reward function, via `register("x", lambda: fn)`);
`combine({...})` makes the weighted sum of several, itself a reward with the same signature.
A name of the form `package.module:function` imports that function (TRL's signature) without
registering it, so a config can use a reward from the user's own code or from `trl.rewards`;
a factory there (one that takes no completions, like `get_soft_overlong_punishment`) is called
with the reward's options to make the reward.
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


def _is_factory(fn) -> bool:
    """A callable that makes a reward rather than being one (TRL's get_soft_overlong_punishment,
    get_cosine_scaled_reward, ...): it takes neither completions, prompts, completion_ids nor
    **kwargs."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind == p.VAR_KEYWORD or p.name in ("completions", "prompts", "completion_ids") for p in params)


def _imported(spec: str, options: dict) -> RewardFn:
    """`package.module:attr`: the reward itself, or, when options are given or `attr` is a
    factory, what `attr(**options)` returns."""
    import importlib

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e})") from None
    if options or _is_factory(fn):
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
    """Weighted sum, itself a reward with TRL's signature. Each part is called by keyword (see
    calling.py); a part's None leaves it out of that sample's sum, and a sample where every
    part is None scores None."""
    from .calling import call_reward, reward_name, weighted_sum

    parts = {}
    for k, w in weights.items():
        fn = get(k, **options.get(k, {})) if isinstance(k, str) else k
        parts[k if isinstance(k, str) else reward_name(fn)] = (fn, float(w))

    def combined(prompts=None, completions=None, completion_ids=None, **columns):
        per = {name: call_reward(fn, prompts, completions, completion_ids, name=name, **columns)
               for name, (fn, _) in parts.items()}
        return weighted_sum(per, {name: w for name, (_, w) in parts.items()})

    combined.__name__ = "+".join(parts)
    return combined
