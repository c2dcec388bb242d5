"""GRPO's objective and the variants later work added, as pure tensor functions.

For a prompt, G sampled completions o_1..o_G get rewards r_i; the advantage of every token of
o_i is the group-normalised reward A_i = (r_i - mean_g r) / scale. With the policy ratio

    rho_t = pi(o_t) / pi_old(o_t)                                  ratio_level "token"
    rho_t = exp(mean_t' log(pi(o_t') / pi_old(o_t')))  for all t   ratio_level "sequence" (GSPO)

the token loss is a surrogate plus a KL penalty:

    clip   l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)       (eps_high > eps_low: DAPO)
    cispo  l_t = -sg(min(rho, cispo_cap)) A log pi(o_t)                     (MiniMax-M1's CISPO)
    + beta * k3_t,  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (times rho with kl_bias_correction)

The surrogate of each token is weighted by the engine-trainer mismatch correction
(train/mismatch.py: truncated or masked importance sampling, IcePop) and, with
`off_policy_mask`, dropped for sequences DeepSeek-V3.2's off-policy sequence mask rejects.
These are the definitions of TRL's GRPOTrainer (tests/test_grpo_loss_trl.py compares them).

Aggregation over the global batch (all processes, all micro-batches):
    grpo     (1/S) sum_i (1/|o_i|) sum_t l_it       per-sequence mean, then mean over sequences
    dapo     (1/T) sum_i sum_t l_it                 token-level: T = completion tokens in the batch
    dr_grpo  (1/(S * L)) sum_i sum_t l_it           constant normaliser: L = the completion cap
A micro-batch's `policy_loss` returns its *sum* (the numerator above) and `loss_normaliser`
its share of the denominator; the training loop divides the sum of the sums by the sum of the
normalisers over the whole step, so the loss does not depend on how the batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import check, setting

from .mismatch import MismatchConfig, correction_weights, off_policy_sequence_mask

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
SURROGATES = ("clip", "cispo")


@dataclass
class GRPOLossConfig(MismatchConfig):
    clip_low: float = setting(0.2, ge=0, lt=1)
    clip_high: float = setting(0.28, ge=0)   # = clip_low for the symmetric PPO clip
    ratio_level: str = setting("token", choices=RATIO_LEVELS)   # "sequence": GSPO
    surrogate: str = setting("clip", choices=SURROGATES)
    cispo_cap: float = setting(5.0, gt=0)    # CISPO's bound on the (detached) ratio
    beta: float = setting(0.0, ge=0)         # k3 KL weight; 0 = no reference model is needed
    kl_bias_correction: bool = False         # multiply k3 by rho (TRL's use_bias_correction_kl)
    aggregation: str = setting("dapo", choices=AGGREGATIONS)
    # dr_grpo's constant normaliser; None: the completion cap (grpo.max_new_tokens), as TRL
    max_completion_len: int | None = setting(None, ge=1)

    def validate(self) -> "GRPOLossConfig":
        """The declared ranges and choices (for a config built in code, not read by the stage),
        then what no single field can say."""
        check(self)
        if self.aggregation == "dr_grpo" and self.max_completion_len is None:
            raise ValueError("dr_grpo needs max_completion_len (the stage sets it to grpo.max_new_tokens)")
        self.correction_bounds()  # raises on an empty interval
        return self


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero_std [N // group_size]) for rewards laid out group after group, as
    TRL computes them: A = (r - group mean) / (std + eps), std with Bessel's correction.

    A NaN reward marks a sample no reward applied to: it is left out of its group's mean and
    std and gets advantage 0 (TRL's treatment of a completion whose every reward is None).
    scale "group": divide by the group's std (GRPO); "batch": by the std of the whole batch;
    "none": mean-centred only (Dr. GRPO). A group of equal rewards, or with fewer than two
    scored samples, has zero advantages; `zero_std` marks it (dynamic sampling drops it).
    `batch_std` gives the batch's std when the batch spans processes (batch_reward_std)."""
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
        if batch_std is None:
            all_valid = r[valid]
            batch_std = float(all_valid.std(unbiased=True)) if all_valid.numel() > 1 else 0.0
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.reshape(-1).to(out_dtype), zero_std


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """rho [B, T] (token) or [B, 1] (sequence: the exponentiated mean log-ratio over the mask)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.exp(log_ratio)


def token_losses(logp, old_logp, advantages, mask, cfg: GRPOLossConfig, ref_logp=None, rollout_logp=None):
    """Per-token loss [B, T] and the pieces metrics need. `advantages` is [B] (per sequence)."""
    adv = advantages[:, None].to(logp.dtype)
    ratio = policy_ratio(logp, old_logp, mask, cfg.ratio_level)
    parts = {"ratio": ratio}
    if cfg.surrogate == "cispo":
        loss = -torch.clamp(ratio, max=cfg.cispo_cap).detach() * adv * logp
        parts["capped"] = (ratio > cfg.cispo_cap) & (adv > 0)
    else:
        clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
        loss = -torch.minimum(ratio * adv, clipped * adv)
        parts["clipped_low"] = (ratio < 1 - cfg.clip_low) & (adv < 0)
        parts["clipped_high"] = (ratio > 1 + cfg.clip_high) & (adv > 0)
    if cfg.off_policy_mask is not None:
        sampling = rollout_logp if rollout_logp is not None else old_logp
        keep = off_policy_sequence_mask(adv, logp, sampling, mask, cfg.off_policy_mask)
        loss = loss * keep
        parts["off_policy_kept"] = keep
    if rollout_logp is not None and cfg.correction != "none":
        weights = correction_weights(old_logp, rollout_logp, mask, cfg)
        loss = loss * weights
        parts["correction"] = weights
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        kl = k3_kl(logp, ref_logp)
        parts["kl"] = kl
        if cfg.kl_bias_correction:
            kl = kl * ratio
        loss = loss + cfg.beta * kl
    return loss, parts


def loss_normaliser(mask: torch.Tensor, aggregation: str, max_completion_len: int | None,
                    sequences: int | None = None) -> float:
    """This micro-batch's share of the aggregation's denominator (see the module docstring).
    `sequences`: the rows that count (default all; a padding row contributes nothing)."""
    S = mask.shape[0] if sequences is None else sequences
    if aggregation == "grpo":
        return float(S)
    if aggregation == "dapo":
        return float(mask.sum())
    if aggregation == "dr_grpo":
        return float(S * max_completion_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate_sum(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The aggregation's numerator over this micro-batch."""
    m = mask.to(per_token.dtype)
    if aggregation == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    if aggregation in ("dapo", "dr_grpo"):
        return (per_token * m).sum()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def policy_loss(logp, old_logp, advantages, mask, cfg: GRPOLossConfig, ref_logp=None,
                rollout_logp=None) -> tuple[torch.Tensor, dict]:
    """(the aggregation's numerator over this micro-batch, metric sums). Metric values are
    (sum, count) pairs over the masked tokens, so they too add up across micro-batches."""
    per_token, parts = token_losses(logp, old_logp, advantages, mask, cfg, ref_logp, rollout_logp)
    total = aggregate_sum(per_token, mask, cfg.aggregation)
    m = mask.bool()
    n = float(m.sum())

    def masked(x):
        return (float(x.detach().expand_as(m)[m].double().sum()), n)

    metrics = {"ratio_mean": masked(parts["ratio"])}
    if cfg.correction != "none" and "correction" not in parts:   # no engine log-probs here
        metrics["correction_weight_mean"] = (0.0, 0.0)
    for key in ("clipped_low", "clipped_high", "capped", "off_policy_kept", "correction", "kl"):
        if key in parts:
            metrics[{"clipped_low": "clip_frac_low", "clipped_high": "clip_frac_high", "capped": "cispo_cap_frac",
                     "off_policy_kept": "off_policy_kept_frac", "correction": "correction_weight_mean"}.get(key, key)
                    ] = masked(parts[key].to(logp.dtype))
    return total, metrics


def grpo_loss(logp, old_logp, advantages, mask, cfg: GRPOLossConfig, ref_logp=None,
              rollout_logp=None) -> tuple[torch.Tensor, dict]:
    """The loss of one batch taken whole (sum / normaliser) and its metric means."""
    total, sums = policy_loss(logp, old_logp, advantages, mask, cfg, ref_logp, rollout_logp)
    loss = total / max(loss_normaliser(mask, cfg.aggregation, cfg.max_completion_len), 1.0)
    return loss, {k: s / c if c else float("nan") for k, (s, c) in sums.items()}
