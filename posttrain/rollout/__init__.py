"""Rollouts for RL, flowing one way: an engine samples them, rewards score them, group
advantages weigh them, and the trainer learns from batches of them (see stages/grpo.py)."""

from .record import Rollout
from .scoring import assign_advantages, score_rollouts

__all__ = ["Rollout", "score_rollouts", "assign_advantages"]
