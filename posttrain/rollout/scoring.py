"""Scoring rollouts with reward functions, TRL's way (reward/calling.py), and turning the
scores into group advantages (train/grpo_loss.group_advantages)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.train.grpo_loss import group_advantages
from reward.calling import as_completions, call_reward, weighted_sum

from .record import Rollout


def score_rollouts(rollouts: list[Rollout], reward_fns: dict[str, Callable], weights: dict[str, float]) -> None:
    """Fill each rollout's per-function `rewards` and weighted `reward`, in place. Every
    function sees the whole batch by keyword: prompts, completions (messages when the prompts
    are chats), completion_ids and each dataset column (None where a prompt lacks it)."""
    if not rollouts:
        return
    prompts = [r.prompt for r in rollouts]
    completions = as_completions([r.text for r in rollouts], prompts)
    completion_ids = [list(r.completion_ids) for r in rollouts]
    keys = sorted(set().union(*(r.columns for r in rollouts)))
    columns = {k: [r.columns.get(k) for r in rollouts] for k in keys}
    per = {name: call_reward(fn, prompts, completions, completion_ids, name=name, **columns)
           for name, fn in reward_fns.items()}
    totals = weighted_sum(per, weights)
    for i, r in enumerate(rollouts):
        r.rewards = {name: values[i] for name, values in per.items()}
        r.reward = totals[i]


def assign_advantages(rollouts: list[Rollout], group_size: int, scale: str) -> list[bool]:
    """Group advantages over consecutive groups of `group_size` rollouts (one prompt each), in
    place; a rollout no reward applied to is left out of its group's baseline and gets 0.
    Returns, per group, whether it carries no signal (equal rewards, or under two scored)."""
    rewards = torch.tensor([float("nan") if r.reward is None else r.reward for r in rollouts], dtype=torch.float64)
    adv, zero = group_advantages(rewards, group_size, scale)
    for r, a in zip(rollouts, adv.tolist()):
        r.advantage = a
    return zero.tolist()
