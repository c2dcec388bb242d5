"""GRPO's loss function for the training loop: the policy's log-probs of a micro-batch of
rollouts (rollout/batch.py), the objective of train/grpo_loss.py as a sum over the micro-batch
with its normaliser, and the MoE balance loss as a per-micro-batch mean (train/steps.py)."""

from __future__ import annotations

from .grpo_loss import GRPOLossConfig, loss_normaliser, policy_loss
from .steps import LossParts


def policy_logprobs(model, batch: dict, temperature: float, replay=None, with_entropy: bool = False):
    """log pi of each completion token [B, T - 1] under the sampling temperature (and entropy).
    With a RoutingReplay and routed experts in the batch, the forward replays the engine's
    routing; the replay stays set until the next call, for recomputation in backward."""
    if replay is not None:
        if "routed_experts" in batch:
            replay.set(batch["routed_experts"])
        else:
            replay.clear()
    return model.token_logprobs(batch["input_ids"], attention_mask=batch["attention_mask"],
                                positions=batch["completion"], temperature=temperature, with_entropy=with_entropy)


class GRPOObjective:
    def __init__(self, cfg: GRPOLossConfig, temperature: float, replay=None):
        self.cfg, self.temperature, self.replay = cfg, temperature, replay

    def counts_for_mean(self, batch: dict) -> bool:
        """A padding micro-batch (no sequence) does not count in the balance loss's mean."""
        return batch["sequences"] > 0

    def normaliser(self, batch: dict) -> float:
        return loss_normaliser(batch["loss_mask"], self.cfg.aggregation, self.cfg.max_completion_len,
                               sequences=batch["sequences"])

    def __call__(self, model, batch: dict):
        logp, entropy = policy_logprobs(model, batch, self.temperature, self.replay, with_entropy=True)
        mask = batch["loss_mask"]
        total, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, self.cfg,
                                     ref_logp=batch.get("ref_logp"),
                                     rollout_logp=batch["rollout_logp"] if batch["has_engine_logp"] else None)
        balance = model.balance_loss()
        if balance is not None and batch["sequences"] == 0:
            balance = balance * 0.0   # a padding micro-batch takes part in the graph, adds nothing
        m = mask.bool()
        metrics["entropy"] = (float(entropy.detach()[m].double().sum()), float(m.sum()))
        metrics["loss"] = (float(total.detach()), self.normaliser(batch))
        metrics["tokens"] = int(batch["attention_mask"].sum())
        if balance is not None:
            metrics["balance"] = float(balance.detach())
        return LossParts(total, balance), metrics
