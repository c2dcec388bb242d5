"""Rewards: rule-based checks, the code sandbox, reward-model scoring and evaluation."""
