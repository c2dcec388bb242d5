"""Corrections for the gap between the rollout engine and the trainer.

The engine samples o_t from its own numbers (other kernels, another precision, for an MoE
perhaps other experts); the objective wants samples of the trainer's policy before the
update, pi_old. Each token's surrogate is weighted (detached) by the importance ratio

    w_t = pi_old(o_t) / pi_engine(o_t)                           correction_level "token"
    w   = prod_t pi_old(o_t) / pi_engine(o_t)  for all t        correction_level "sequence"

then bounded to [correction_min, correction_max]:
    tis     truncated: w clamped into the bounds (the classic TIS caps from above only)
    mis     masked: w where it lies within the bounds, 0 outside (the token or sequence is dropped)
    icepop  IcePop: mis at token level with two-sided bounds (default [0.5, 5])
These are TRL's vllm_importance_sampling_mode token_/sequence_ truncate/mask. A token whose
engine log-prob is unknown (NaN) gets ratio 1.

`off_policy_sequence_mask` is DeepSeek-V3.2's off-policy sequence mask: a sequence with a
negative advantage whose mean log-ratio log(pi_engine / pi) over its tokens exceeds delta
contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.config import setting

CORRECTIONS = ("none", "tis", "mis", "icepop")
CORRECTION_LEVELS = ("token", "sequence")
_DEFAULT_BOUNDS = {"none": (None, None), "tis": (None, 2.0), "mis": (None, 2.0), "icepop": (0.5, 5.0)}


@dataclass
class MismatchConfig:
    correction: str = setting("tis", choices=CORRECTIONS)
    correction_level: str = setting("token", choices=CORRECTION_LEVELS)
    correction_min: float | None = setting(None, ge=0)   # None: the mode's default (see above)
    correction_max: float | None = setting(None, gt=0)
    off_policy_mask: float | None = setting(None, ge=0)  # DeepSeek-V3.2's delta; None = off

    def correction_bounds(self) -> tuple[float, float]:
        lo_default, hi_default = _DEFAULT_BOUNDS[self.correction]
        lo = self.correction_min if self.correction_min is not None else lo_default
        hi = self.correction_max if self.correction_max is not None else hi_default
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
        if lo > hi:
            raise ValueError(f"correction_min ({lo}) is above correction_max ({hi})")
        if self.correction == "icepop" and self.correction_level != "token":
            raise ValueError("icepop is a token-level correction (use mis for sequence-level masking)")
        return lo, hi


def engine_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     level: str) -> torch.Tensor:
    """log(pi_old / pi_engine) per token [B, T] or summed over each sequence [B, 1]; masked
    positions and unknown engine log-probs count 0."""
    diff = torch.nan_to_num((old_logp - rollout_logp) * mask.to(old_logp.dtype), nan=0.0)
    return diff.sum(-1, keepdim=True) if level == "sequence" else diff


@torch.no_grad()
def correction_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       cfg: MismatchConfig) -> torch.Tensor:
    """The weights on each token's surrogate, [B, T] or [B, 1]."""
    w = torch.exp(engine_log_ratio(old_logp, rollout_logp, mask, cfg.correction_level))
    lo, hi = cfg.correction_bounds()
    if cfg.correction == "tis":
        return torch.clamp(w, min=lo if lo > -math.inf else None, max=hi if hi < math.inf else None)
    if cfg.correction in ("mis", "icepop"):
        return w.masked_fill((w < lo) | (w > hi), 0.0)
    raise ValueError(f"correction must be one of {CORRECTIONS}, got {cfg.correction!r}")


@torch.no_grad()
def off_policy_sequence_mask(adv_B1: torch.Tensor, logp: torch.Tensor, sampling_logp: torch.Tensor,
                             mask: torch.Tensor, delta: float) -> torch.Tensor:
    """[B, 1]: 0 for a sequence with A < 0 whose mean log(pi_sampling / pi) exceeds delta, else 1."""
    m = mask.to(logp.dtype)
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    mean_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv_B1 >= 0) | (mean_kl <= delta)).to(logp.dtype)


@torch.no_grad()
def mismatch_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the engine's log-probs are from the trainer's on the sampled tokens, as sums and
    counts to merge across micro-batches and processes: |gap| max and sum, the k1 and k3
    estimates of KL(engine || trainer) (samples come from the engine)."""
    m = mask.bool() & ~torch.isnan(rollout_logp)
    d = (rollout_logp - old_logp)[m].double()   # log(pi_engine / pi_trainer) at engine samples
    return {"gap_max": float(d.abs().max()) if d.numel() else 0.0, "gap_sum": float(d.abs().sum()),
            "k1_sum": float(d.sum()), "k3_sum": float((torch.exp(-d) + d - 1).sum()), "tokens": int(d.numel())}
