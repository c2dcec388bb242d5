"""rollouts.jsonl: every sample of every iteration (all processes'), with its completion,
token ids, finish reason, per-reward scores, reward and advantage."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.io_utils import truncate_jsonl
from posttrain.train.collective import all_gather

from .record import Rollout


class RolloutLog:
    def __init__(self, path: Path, enabled: bool, writer: bool):
        self.path, self.enabled, self.writer = path, enabled, writer

    def resume_at(self, iteration: int) -> None:
        """Drop the rows of iterations from `iteration` on (a resumed run samples them again)."""
        if self.enabled and self.writer:
            truncate_jsonl(self.path, lambda row: row.get("iteration", 0) < iteration)

    def log(self, iteration: int, rollouts: list[Rollout]) -> None:
        if not self.enabled:
            return
        gathered = all_gather([r.log_row(iteration) for r in rollouts])  # every process takes part
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for part in gathered:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
