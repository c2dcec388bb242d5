"""Scoring rollouts with reward functions, TRL's way (reward/calling.py), and turning the
scores into group advantages (train/grpo_loss.group_advantages)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.train.collective import all_sum
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
    batch_std = batch_reward_std(rewards) if scale == "batch" else None
    adv, zero = group_advantages(rewards, group_size, scale, batch_std=batch_std)
    for r, a in zip(rollouts, adv.tolist()):
        r.advantage = a
    return zero.tolist()


def batch_reward_std(rewards: torch.Tensor) -> float:
    """The std (Bessel-corrected) of the scored rewards of the whole batch, over every process:
    each process holds a share of the batch, and TRL scales by the gathered batch's std. Two
    passes (mean, then squared deviations) keep it exact where rewards are large and close.
    A collective: every process calls it together."""
    valid = rewards[~torch.isnan(rewards)]
    n, total = all_sum([float(valid.numel()), float(valid.sum())])
    if n < 2:
        return 0.0
    (squares,) = all_sum([float((valid - total / n).square().sum())])
    return (squares / (n - 1)) ** 0.5
