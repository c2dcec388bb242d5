"""The typed rollout record: one sampled completion and what every later step needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rollout:
    prompt_id: str
    prompt: list[dict] | str            # as the engine was given it (chat messages or text)
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str                  # "stop" (eos / stop token / stop string) | "length"
    engine_logprobs: list[float] | None = None   # the engine's, of the sampled distribution
    # the experts the engine routed each processed token to: [len(prompt_ids) +
    # len(completion_ids) - 1, MoE layers, K] (numpy), for routing replay
    routed_experts: Any = None
    columns: dict[str, Any] = field(default_factory=dict)    # the prompt's dataset columns
    rewards: dict[str, float | None] = field(default_factory=dict)  # per reward function; None = n/a
    reward: float | None = None         # weighted sum of the rewards that apply; None if none does
    advantage: float = 0.0
    policy_version: int = 0             # the optimizer step whose weights sampled it

    def log_row(self, iteration: int) -> dict:
        """What rollouts.jsonl keeps of it."""
        return {"iteration": iteration, "policy_version": self.policy_version, "prompt_id": self.prompt_id,
                "completion": self.text, "completion_ids": self.completion_ids, "finish_reason": self.finish_reason,
                "rewards": self.rewards, "reward": self.reward, "advantage": self.advantage}
