"""Calling reward functions the way TRL's GRPOTrainer does, so that functions written for TRL
(trl.rewards, open-r1, a user's own) and posttrain's rewards are interchangeable.

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

* by keyword, never by position;
* completions as chat messages ([{"role": "assistant", "content": text}]) when the prompts are
  chats, as strings otherwise;
* `completion_ids` are the completions' token ids (what length-based rewards count);
* every other dataset column by its name, one value per completion;
* `None` (or NaN) means "not applicable": it is left out of a weighted sum, and a sample for
  which every reward is None has no reward at all (GRPO then gives it advantage 0, as TRL).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

STANDARD = ("prompts", "completions", "completion_ids")


def reward_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def is_chat(prompt) -> bool:
    """TRL's test: a prompt is conversational when it is a list of role/content messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def as_completions(texts: Sequence[str], prompts: Sequence) -> list:
    """Completions in the form TRL hands them over: messages when the prompts are chats."""
    if prompts and is_chat(prompts[0]):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def required_columns(fn: Callable) -> set[str]:
    """Parameters `fn` cannot do without, other than prompts / completions / completion_ids."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    return {name for name, p in sig.parameters.items()
            if p.default is inspect.Parameter.empty and name not in STANDARD
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_columns(fns: dict[str, Callable], columns: set[str]) -> None:
    """A clear error, before any sampling, for a reward that needs a column the data lacks
    (TRL's accuracy_reward needs `solution`; called by position it would silently score the
    prompt against the completion)."""
    for name, fn in fns.items():
        missing = sorted(required_columns(fn) - columns)
        if missing:
            have = ", ".join(sorted(columns)) or "none"
            raise ValueError(f"reward {name!r} needs the column(s) {', '.join(map(repr, missing))}, which the "
                             f"prompts do not have (they have: {have}); add the field to the prompt data or "
                             "map it with prompts.fields")


def call_reward(fn: Callable, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                name: str | None = None, **columns) -> list[float | None]:
    """One reward function over a batch, by keyword; values checked (float, or None for NaN/None)."""
    name = name or reward_name(fn)
    n = len(completions)
    kwargs = dict(columns)
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    values = fn(prompts=prompts, completions=completions, **kwargs)
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"reward {name!r} returned {type(values).__name__}, not a list of scores") from None
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} scores for {n} completions")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"reward {name!r} returned {type(v).__name__} {v!r:.50}, not a number or None") from None
        if math.isinf(f):
            raise ValueError(f"reward {name!r} returned {f}: a score must be finite (or None for not applicable)")
        out.append(None if math.isnan(f) else f)
    return out


def weighted_sum(per_reward: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Sum of weight x value over the rewards that apply to each sample; None where none does."""
    n = len(next(iter(per_reward.values()))) if per_reward else 0
    total: list[float | None] = [None] * n
    for name, values in per_reward.items():
        w = weights[name]
        for i, v in enumerate(values):
            if v is not None:
                total[i] = (total[i] or 0.0) + w * v
    return total
