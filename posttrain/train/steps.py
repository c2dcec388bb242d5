"""What the training loop consumes: the micro-batches of each optimizer step, and the loss.

A `StepSource` hands `Trainer.fit` each step's micro-batches and owns its data position (saved
in every checkpoint, restored on resume):

    total_steps: int                          optimizer steps of the whole run
    next_step(trainer) -> list[dict]          this process's micro-batches of the next step
    step_metrics(trainer) -> dict             extra metrics for the step just taken
    state_dict() / load_state_dict(state)     the data position

`RowSteps` is the source of SFT and reward-model training: rows cut by a `BatchPlan`, a fixed
number of micro-batches per step. GRPO's source samples, scores and batches rollouts
(rollout/steps.py).

A loss function is `loss_fn(model, batch) -> (loss, metrics)`. By default each micro-batch's
loss is a mean and the step averages them. A loss function with a `normaliser(batch)` method
returns `LossParts` instead: a sum whose divisor is the sum of `normaliser` over the step's
micro-batches on every process (so the loss does not depend on how the batch is split), plus
an optional term that is a mean per micro-batch (the MoE balance loss). A metric given as a
(sum, count) pair is summed over micro-batches and processes and logged as sum / count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch


class BatchPlan:
    """Which rows form micro-batch i: epoch-seeded permutations, cut into equal chunks."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, world: int = 1, rank: int = 0):
        if n_rows < batch_size * world:
            raise ValueError(f"{n_rows} rows are fewer than one global batch ({batch_size} x {world} processes)")
        self.n_rows, self.batch_size, self.seed, self.world, self.rank = n_rows, batch_size, seed, world, rank
        self.per_epoch = n_rows // (batch_size * world)  # the incomplete tail of an epoch is not used
        self._perm_epoch, self._perm = -1, None

    def rows(self, micro_batch: int) -> list[int]:
        epoch, k = divmod(micro_batch, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        start = (k * self.world + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()


class StepSource(Protocol):
    total_steps: int

    def next_step(self, trainer) -> list[dict]: ...   # or any sized iterable of batches

    def step_metrics(self, trainer) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LossParts:
    """A loss with a `normaliser`: `total` is summed over the step and divided by the summed
    normalisers; `mean` (optional) is averaged over the step's micro-batches."""

    total: torch.Tensor
    mean: torch.Tensor | None = None


class RowSteps:
    """Steps of `grad_accum` micro-batches of rows, in `BatchPlan` order."""

    def __init__(self, rows, collate: Callable[[list], dict], plan: BatchPlan, grad_accum: int, total_steps: int):
        self.rows, self.collate, self.plan, self.grad_accum = rows, collate, plan, grad_accum
        self.total_steps = total_steps
        self.micro = 0   # micro-batches consumed: the data position

    def next_step(self, trainer) -> "_Collated":
        picks = [self.plan.rows(self.micro + k) for k in range(self.grad_accum)]
        self.micro += self.grad_accum
        return _Collated(self.rows, self.collate, picks)

    def step_metrics(self, trainer) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.micro = int(state["micro"])


class _Collated:
    """A step's micro-batches, collated as they are iterated (one in memory at a time)."""

    def __init__(self, rows, collate, picks: list[list[int]]):
        self.rows, self.collate, self.picks = rows, collate, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __iter__(self):
        for idx in self.picks:
            yield self.collate([self.rows[i] for i in idx])
