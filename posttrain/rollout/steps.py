"""GRPO's source of optimizer steps for `Trainer.fit` (train/steps.py).

One iteration: take `prompts_per_step` prompts (a seeded permutation, epoch by epoch; each
process its share), sample `group_size` completions of each from the current policy, score
them (reward/calling.py: TRL's convention), turn rewards into group advantages, drop groups
whose rewards are all equal and refill from the next prompts (dynamic sampling, bounded),
compute the policy's log-probs of the completions before the update (the "old" policy) and
the reference's (when beta > 0), and cut the rollouts into micro-batches; the same batch then
serves `updates_per_batch` optimizer steps.

The data position (prompt batches consumed) is saved with every checkpoint, and a prompt
batch's sampling seeds are a function of it: a resumed run samples what the uninterrupted
one did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from data_recipes.prompt_sets import PromptRecord
from posttrain.train.collective import all_gather, all_max, all_sum, world_size
from posttrain.train.cpu_threads import cpu_threads
from posttrain.train.grpo_objective import policy_logprobs
from posttrain.train.mismatch import mismatch_stats
from posttrain.train.steps import BatchPlan

from .batch import collate_rollouts, empty_batch
from .log import RolloutLog
from .record import Rollout
from .scoring import assign_advantages


class GRPOSteps:
    def __init__(self, grpo, seed: int, iterations: int, prompts: list[PromptRecord],
                 sample: Callable[[list[PromptRecord], int, int], list[Rollout]], model: torch.nn.Module,
                 ref: torch.nn.Module | None, replays: dict, routing: tuple[int, int] | None, pad: int,
                 device, rank: int, rollout_log: RolloutLog, reward_names: list[str],
                 evaluate: Callable[[], dict] | None = None, eval_every: int = 0,
                 sync_seconds: Callable[[], float] = lambda: 0.0, autocast=contextlib.nullcontext,
                 rest: Callable[[], None] = lambda: None):
        """grpo: the GRPOSection; sample(records, seed, policy_version) -> scored rollouts;
        replays: {"policy": RoutingReplay, "ref": RoutingReplay} when routing is replayed;
        routing: (MoE layers, K) when rollouts carry routed experts; sync_seconds() -> the
        seconds spent putting new weights into the engine since it was last called; rest()
        frees the accelerator once an iteration's sampling, refills included, is done."""
        self.g, self.seed, self.iterations = grpo, seed, iterations
        self.total_steps = iterations * grpo.updates_per_batch
        self.world = world_size()
        if grpo.prompts_per_step % self.world:
            from posttrain.model.args import ConfigError
            raise ConfigError(f"grpo.prompts_per_step ({grpo.prompts_per_step}) must divide evenly over "
                              f"{self.world} processes")
        self.per_rank = grpo.prompts_per_step // self.world
        try:
            self.plan = BatchPlan(len(prompts), self.per_rank, seed, self.world, rank)
        except ValueError as e:
            from posttrain.errors import DataError
            raise DataError(f"{len(prompts)} training prompts are fewer than grpo.prompts_per_step "
                            f"({grpo.prompts_per_step}): lower it or give more prompts") from e
        self.prompts, self.sample, self.model, self.ref = prompts, sample, model, ref
        self.replays, self.routing, self.pad, self.device, self.rank = replays, routing, pad, device, rank
        self.log, self.reward_names = rollout_log, reward_names
        self.evaluate, self.eval_every, self.sync_seconds = evaluate, eval_every, sync_seconds
        self.autocast = autocast   # the training forward's precision context, for the old log-probs
        self.rest = rest
        self.prompt_batches = 0         # the data position
        self._batches: list[dict] = []  # the current iteration's micro-batches
        self._row: dict = {}
        self._log_resumed = False

    # ------------------------------------------------------------ position
    def state_dict(self) -> dict:
        return {"prompt_batches": self.prompt_batches}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_batches = int(state.get("prompt_batches", state.get("micro", 0)))

    # ------------------------------------------------------------ steps
    def next_step(self, trainer) -> list[dict]:
        if trainer.step % self.g.updates_per_batch == 0:
            iteration = trainer.step // self.g.updates_per_batch
            if not self._log_resumed:   # a resumed run logs its iterations again from here
                self.log.resume_at(iteration)
                self._log_resumed = True
            self._row = {"iteration": iteration}
            t = time.perf_counter()
            kept, sampled, flat = self._generate(trainer.step)
            self.rest()
            self._row.update(self._rollout_metrics(sampled, flat))
            self.log.log(iteration, sampled)
            sync = self.sync_seconds()
            self._row.update(rollout_s=time.perf_counter() - t - sync, weight_sync_s=sync)
            t = time.perf_counter()
            self._batches = self._micro_batches(kept)
            self._row["logprob_s"] = time.perf_counter() - t
        return self._batches

    def step_metrics(self, trainer) -> dict:
        row, self._row = self._row, {}
        last_of_iteration = trainer.step % self.g.updates_per_batch == 0
        iteration = trainer.step // self.g.updates_per_batch
        if (last_of_iteration and self.evaluate is not None and self.eval_every
                and iteration % self.eval_every == 0 and trainer.step < self.total_steps):
            row["eval_accuracy"] = self.evaluate()["accuracy"]
        return row

    # ------------------------------------------------------------ sampling
    def _generate(self, policy_version: int) -> tuple[list[Rollout], list[Rollout], list[bool]]:
        """Rollouts of this process's share of the prompt batch, refilled (on every process
        alike, so the data position stays in step) while any process lacks informative groups.
        Returns (kept rollouts, every rollout sampled, per group: no signal)."""
        g = self.g
        for replay in self.replays.values():
            replay.clear()     # sampling routes by itself
        want = self.per_rank * g.group_size
        kept, sampled, flat = [], [], []
        for _ in range(1 + (g.max_refills if g.dynamic_sampling else 0)):
            records = [self.prompts[i] for i in self.plan.rows(self.prompt_batches)]
            self.prompt_batches += 1
            # prompt j of the global batch gets seed base + j on whichever process it lands, so a
            # run's samples do not depend on the number of processes
            seed = (self.seed * 1_000_003 + self.prompt_batches) * 65_536 + self.rank * self.per_rank
            rollouts = self.sample(records, seed, policy_version)
            no_signal = assign_advantages(rollouts, g.group_size, g.advantage_scale)
            sampled += rollouts
            flat += no_signal
            for k, is_flat in enumerate(no_signal):
                if not (g.dynamic_sampling and is_flat):
                    kept += rollouts[k * g.group_size:(k + 1) * g.group_size]
            if not g.dynamic_sampling or all_sum([float(len(kept) < want)])[0] == 0:
                break
        return kept, sampled, flat

    def _rollout_metrics(self, sampled: list[Rollout], flat: list[bool]) -> dict:
        """Over every process's samples; a reward's mean is over the samples it applies to."""
        mine = {"reward": [r.reward for r in sampled], "lengths": [len(r.completion_ids) for r in sampled],
                "truncated": [r.finish_reason == "length" for r in sampled], "flat": flat,
                "per_reward": {k: [r.rewards[k] for r in sampled] for k in self.reward_names}}
        merged = {"reward": [], "lengths": [], "truncated": [], "flat": [], "per_reward": {k: [] for k in self.reward_names}}
        for part in all_gather(mine):
            for key in ("reward", "lengths", "truncated", "flat"):
                merged[key] += part[key]
            for k, v in part["per_reward"].items():
                merged["per_reward"][k] += v
        scored = torch.tensor([x for x in merged["reward"] if x is not None], dtype=torch.float64)
        row = {"reward_mean": float(scored.mean()) if scored.numel() else float("nan"),
               "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
               "unscored_frac": sum(x is None for x in merged["reward"]) / len(merged["reward"]),
               "zero_std_group_frac": sum(merged["flat"]) / len(merged["flat"]),
               "truncated_frac": sum(merged["truncated"]) / len(merged["truncated"]),
               "response_len_mean": sum(merged["lengths"]) / len(merged["lengths"])}
        for k, v in merged["per_reward"].items():
            applied = [x for x in v if x is not None]
            row[f"reward/{k}"] = sum(applied) / len(applied) if applied else float("nan")
        if "math" in merged["per_reward"]:
            applied = [x for x in merged["per_reward"]["math"] if x is not None]
            row["accuracy"] = sum(x == 1.0 for x in applied) / len(applied) if applied else float("nan")
        return row

    # ------------------------------------------------------------ batches
    def _micro_batches(self, kept: list[Rollout]) -> list[dict]:
        """This process's micro-batches, padded with empty ones to the most any process has,
        with the old policy's and the reference's log-probs, and how far the engine's
        log-probs are from the old policy's (logged every step)."""
        g = self.g
        size = g.micro_batch_size
        micro = [collate_rollouts(kept[s:s + size], self.pad, g.mask_truncated, self.routing)
                 for s in range(0, len(kept), size)]
        n_micro = int(all_max([float(len(micro))])[0])
        micro += [empty_batch(self.pad, self.routing) for _ in range(n_micro - len(micro))]
        stats = {"gap_max": 0.0, "gap_sum": 0.0, "k1_sum": 0.0, "k3_sum": 0.0, "tokens": 0}
        for b in micro:   # the empty ones too: a sharded forward is collective
            on_device = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}
            b["old_logp"] = self._logprobs(self.model, on_device, self.replays.get("policy"))
            if self.ref is not None:
                b["ref_logp"] = self._logprobs(self.ref, on_device, self.replays.get("ref"))
            if self.device.type == "cpu":
                cpu_threads().tick()
            s = mismatch_stats(b["old_logp"], b["rollout_logp"], b["completion"])
            stats["gap_max"] = max(stats["gap_max"], s["gap_max"])
            for k in ("gap_sum", "k1_sum", "k3_sum", "tokens"):
                stats[k] += s[k]
        sequences, tokens, gap_sum, k1, k3 = all_sum([float(len(kept)), stats["tokens"], stats["gap_sum"],
                                                       stats["k1_sum"], stats["k3_sum"]])
        self._row["sequences"] = int(sequences)
        if tokens:
            self._row.update(engine_logp_gap_max=all_max([stats["gap_max"]])[0], engine_logp_gap_mean=gap_sum / tokens,
                             engine_kl_k1=k1 / tokens, engine_kl_k3=k3 / tokens)
        return micro

    @torch.no_grad()
    def _logprobs(self, model, batch: dict, replay) -> torch.Tensor:
        """Of a batch already on the device. In eval mode: these forwards must not count toward
        the MoE loads of the next update."""
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                return policy_logprobs(model, batch, self.g.temperature, replay)[0].float().cpu()
        finally:
            model.train(was_training)
