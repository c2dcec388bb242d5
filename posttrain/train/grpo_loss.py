"""GRPO's objective, with the variants later work added, as pure tensor functions.

For a prompt, G sampled completions o_1..o_G get rewards r_i; the advantage of every token of
o_i is the group-normalised reward A_i = (r_i - mean_g r) / scale. With the per-token ratio
rho = pi(o_t) / pi_old(o_t), the token loss is the clipped surrogate plus a KL penalty:

    l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (unbiased, always >= 0)

eps_high > eps_low is DAPO's clip-higher. When the rollout engine's log-probs differ from the
trainer's (another kernel, another precision), the surrogate of each token is weighted by the
truncated importance ratio min(pi_old / pi_rollout, cap) (detached).

Aggregation over the global batch (all ranks, all micro-batches), so that the loss does not
depend on how the batch is split:
    grpo     (1/S) sum_i (1/|o_i|) sum_t l_it       per-sequence mean, then mean over sequences
    dapo     (1/T) sum_i sum_t l_it                 token-level: T = completion tokens in the batch
    dr_grpo  (1/(S * L)) sum_i sum_t l_it           constant normaliser: L = max completion length
`aggregate` returns one micro-batch's share given the global S and T; the shares of all
micro-batches on all ranks sum to the loss above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import setting

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


@dataclass
class GRPOLossConfig:
    clip_low: float = setting(0.2, ge=0, lt=1)
    clip_high: float = setting(0.28, ge=0)   # = clip_low for the symmetric PPO clip
    beta: float = setting(0.0, ge=0)         # k3 KL weight; 0 = no reference model is needed
    aggregation: str = setting("dapo", choices=AGGREGATIONS)
    max_completion_len: int = setting(1024, ge=1)   # dr_grpo's constant normaliser
    tis_cap: float | None = setting(2.0, ge=1)      # truncated importance sampling; None = off

    def validate(self) -> "GRPOLossConfig":
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("need 0 <= clip_low < 1 and clip_high >= 0")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ValueError("tis_cap must be >= 1 (or None)")
        return self


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero_std [N // group_size]) for rewards laid out group after group, as
    TRL computes them: A = (r - group mean) / (std + eps), std with Bessel's correction.

    A NaN reward marks a sample no reward applied to: it is left out of its group's mean and
    std and gets advantage 0 (TRL's treatment of a completion whose every reward is None).
    scale "group": divide by the group's std (GRPO); "batch": by the std of the whole batch;
    "none": mean-centred only (Dr. GRPO). A group of equal rewards, or with fewer than two
    scored samples, has zero advantages; `zero_std` marks it (dynamic sampling drops it)."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    valid = ~torch.isnan(r)
    n = valid.sum(dim=1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(valid, r - mean, 0.0)
    std = (centred.square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    zero_std = (n.squeeze(1) < 2) | (std.squeeze(1) == 0)
    if scale == "group":
        adv = centred / (std + eps)
    elif scale == "batch":
        all_valid = r[valid]
        bstd = all_valid.std(unbiased=True) if all_valid.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv = centred / (bstd + eps)
    else:
        adv = centred
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.reshape(-1).to(out_dtype), zero_std


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_losses(logp, old_logp, advantages, cfg: GRPOLossConfig, ref_logp=None, rollout_logp=None):
    """Per-token loss [B, T] and the pieces metrics need. `advantages` is [B] (per sequence)."""
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    tis = None
    if rollout_logp is not None and cfg.tis_cap is not None:
        tis = torch.clamp(torch.exp(old_logp - rollout_logp), max=cfg.tis_cap).detach()
        surrogate = surrogate * tis
    loss = -surrogate
    kl = None
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        kl = k3_kl(logp, ref_logp)
        loss = loss + cfg.beta * kl
    return loss, {"ratio": ratio, "kl": kl, "tis": tis,
                  "clipped_low": (ratio < 1 - cfg.clip_low) & (adv < 0),
                  "clipped_high": (ratio > 1 + cfg.clip_high) & (adv > 0)}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, global_sequences: int,
              global_tokens: int, max_completion_len: int) -> torch.Tensor:
    """This micro-batch's share of the global loss (see the module docstring)."""
    m = mask.to(per_token.dtype)
    if mode == "grpo":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / global_sequences
    if mode == "dapo":
        return (per_token * m).sum() / max(global_tokens, 1)
    if mode == "dr_grpo":
        return (per_token * m).sum() / (global_sequences * max_completion_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def grpo_loss(logp, old_logp, advantages, mask, cfg: GRPOLossConfig, ref_logp=None, rollout_logp=None,
              global_sequences: int | None = None, global_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """(loss share, metrics). Without global counts the micro-batch is the whole batch."""
    per_token, parts = token_losses(logp, old_logp, advantages, cfg, ref_logp, rollout_logp)
    S = global_sequences if global_sequences is not None else logp.shape[0]
    T = global_tokens if global_tokens is not None else int(mask.sum())
    loss = aggregate(per_token, mask, cfg.aggregation, S, T, cfg.max_completion_len)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    metrics = {
        "clip_frac_low": float(parts["clipped_low"][m].float().sum() / n),
        "clip_frac_high": float(parts["clipped_high"][m].float().sum() / n),
        "ratio_mean": float(parts["ratio"].detach()[m].mean()) if m.any() else 1.0,
    }
    if parts["kl"] is not None:
        metrics["kl"] = float(parts["kl"].detach()[m].mean()) if m.any() else 0.0
    if parts["tis"] is not None:
        metrics["tis_weight_mean"] = float(parts["tis"][m].mean()) if m.any() else 1.0
    return loss, metrics


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the policy at each position [B, T] (float32), for logging."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
