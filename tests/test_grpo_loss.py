"""GRPO loss variants against a float64 hand computation on a small batch: the clipped and
CISPO surrogates at token and sequence (GSPO) level, clipping at both bounds, the k3 KL with
and without bias correction, truncated / masked importance sampling and IcePop at both
bounds, DeepSeek-V3.2's off-policy sequence mask, the three aggregations, and advantages."""

import math

import pytest
import torch

from posttrain.train.grpo_loss import GRPOLossConfig, group_advantages, grpo_loss, k3_kl


def _batch():
    """3 sequences x 5 tokens; ratios chosen to land below, inside and above the clip range."""
    g = torch.Generator().manual_seed(11)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    shift = torch.tensor([[0.5, -0.5, 0.05, 0.0, 0.3],     # A > 0: high clip on token 0 and 4
                          [-0.6, 0.4, -0.1, 0.2, 0.0],     # A < 0: low clip on token 0
                          [0.1, -0.1, 0.02, 0.0, 0.0]], dtype=torch.float64)
    logp = old + shift
    ref = old + torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.4 - 0.2
    rollout = old + torch.rand(3, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    return logp, old, ref, rollout, mask, adv


def _bounds(cfg):
    lo = cfg.correction_min if cfg.correction_min is not None else {"tis": None, "mis": None, "icepop": 0.5}[cfg.correction]
    hi = cfg.correction_max if cfg.correction_max is not None else {"tis": 2.0, "mis": 2.0, "icepop": 5.0}[cfg.correction]
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


def _hand(logp, old, ref, rollout, mask, adv, cfg):
    """The loss, token by token in Python floats (float64), from the definitions."""
    B, T = logp.shape
    L = [[float(x) for x in row] for row in logp]
    O = [[float(x) for x in row] for row in old]
    R = [[float(x) for x in row] for row in ref]
    E = [[float(x) for x in row] for row in rollout]
    M = [[bool(x) for x in row] for row in mask]
    per_seq, total, ntok = [], 0.0, 0
    for i in range(B):
        a = float(adv[i])
        toks = [t for t in range(T) if M[i][t]]
        seq_log_ratio = sum(L[i][t] - O[i][t] for t in toks) / max(len(toks), 1)
        seq_engine = math.exp(sum(O[i][t] - E[i][t] for t in toks))
        keep_seq = 1.0
        if cfg.off_policy_mask is not None:
            mean_kl = sum(E[i][t] - L[i][t] for t in toks) / max(len(toks), 1)
            keep_seq = 1.0 if (a >= 0 or mean_kl <= cfg.off_policy_mask) else 0.0
        s = 0.0
        for t in toks:
            rho = math.exp(seq_log_ratio) if cfg.ratio_level == "sequence" else math.exp(L[i][t] - O[i][t])
            if cfg.surrogate == "cispo":
                sur = min(rho, cfg.cispo_cap) * a * L[i][t]
            else:
                sur = min(rho * a, min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high) * a)
            sur *= keep_seq
            if cfg.correction != "none":
                w = seq_engine if cfg.correction_level == "sequence" else math.exp(O[i][t] - E[i][t])
                lo, hi = _bounds(cfg)
                if cfg.correction == "tis":
                    w = min(max(w, lo), hi)
                elif not lo <= w <= hi:
                    w = 0.0
                sur *= w
            l = -sur
            if cfg.beta:
                d = R[i][t] - L[i][t]
                kl = math.exp(d) - d - 1
                l += cfg.beta * kl * (rho if cfg.kl_bias_correction else 1.0)
            s += l
        per_seq.append((s, len(toks)))
        total += s
        ntok += len(toks)
    if cfg.aggregation == "grpo":
        return sum(s / max(n, 1) for s, n in per_seq) / B
    if cfg.aggregation == "dapo":
        return total / ntok
    return total / (B * cfg.max_completion_len)


VARIANTS = [
    dict(),                                                         # DAPO's defaults: token TIS at 2
    dict(aggregation="grpo", correction="none"),
    dict(aggregation="dr_grpo", max_completion_len=7, beta=0.04),
    dict(beta=0.04, kl_bias_correction=True),
    dict(ratio_level="sequence", aggregation="grpo", clip_low=0.05, clip_high=0.06),      # GSPO
    dict(ratio_level="sequence", correction="mis", correction_level="sequence", correction_max=1.5),
    dict(surrogate="cispo", cispo_cap=1.2),
    dict(surrogate="cispo", cispo_cap=5.0, aggregation="dr_grpo", max_completion_len=5, beta=0.1),
    dict(correction="tis", correction_min=0.8, correction_max=1.3),
    dict(correction="tis", correction_level="sequence", correction_max=1.7),
    dict(correction="mis", correction_min=0.7, correction_max=1.4),
    dict(correction="icepop"),
    dict(correction="icepop", correction_min=0.8, correction_max=1.25, aggregation="grpo"),
    dict(off_policy_mask=0.05, correction="none"),
    dict(off_policy_mask=0.0, beta=0.04, kl_bias_correction=True, ratio_level="sequence", aggregation="grpo"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_each_variant_equals_the_float64_hand_computation(variant):
    logp, old, ref, rollout, mask, adv = _batch()
    cfg = GRPOLossConfig(**variant).validate()
    loss, metrics = grpo_loss(logp, old, adv, mask, cfg, ref_logp=ref, rollout_logp=rollout)
    assert loss.item() == pytest.approx(_hand(logp, old, ref, rollout, mask, adv, cfg), rel=1e-12, abs=1e-15)
    if cfg.beta:
        assert metrics["kl"] > 0


def test_the_batch_reaches_both_bounds_of_every_clip_and_correction():
    """The hand-checked batch is only a test if each bound is active somewhere in it."""
    from posttrain.train.mismatch import correction_weights
    logp, old, ref, rollout, mask, adv = _batch()
    _, m = grpo_loss(logp, old, adv, mask, GRPOLossConfig(correction="none"))
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0
    _, m = grpo_loss(logp, old, adv, mask, GRPOLossConfig(surrogate="cispo", cispo_cap=1.2, correction="none"))
    assert m["cispo_cap_frac"] > 0
    w_token = torch.exp(old - rollout)[mask.bool()]
    for lo, hi in ((0.8, 1.3), (0.7, 1.4)):
        assert (w_token < lo).any() and (w_token > hi).any() and ((w_token >= lo) & (w_token <= hi)).any()
    tis = correction_weights(old, rollout, mask, GRPOLossConfig(correction="tis", correction_min=0.8,
                                                                 correction_max=1.3))[mask.bool()]
    assert tis.min() == 0.8 and tis.max() == 1.3
    mis = correction_weights(old, rollout, mask, GRPOLossConfig(correction="mis", correction_min=0.7,
                                                                 correction_max=1.4))[mask.bool()]
    assert (mis == 0).any() and (mis > 0).any()
    seq = torch.exp(((old - rollout) * mask).sum(-1))
    assert (seq > 1.5).any() and (seq <= 1.5).any()           # the sequence-level mask drops one, keeps one
    _, m = grpo_loss(logp, old, adv, mask, GRPOLossConfig(off_policy_mask=0.05, correction="none"),
                     rollout_logp=rollout)
    assert 0 < m["off_policy_kept_frac"] < 1


def test_gradient_is_zero_where_the_clip_is_active_and_not_elsewhere():
    logp, old, _, _, mask, adv = _batch()
    logp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, adv, mask, GRPOLossConfig(aggregation="dapo", correction="none"))
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[0, 4] == 0      # A > 0, ratio above 1 + eps_high
    assert g[1, 0] == 0                       # A < 0, ratio below 1 - eps_low
    assert g[0, 1] != 0 and g[1, 1] != 0 and g[2, 2] != 0
    assert (g[mask == 0] == 0).all()


def test_cispo_keeps_the_gradient_of_capped_tokens_and_gspo_clips_whole_sequences():
    logp, old, _, _, mask, adv = _batch()
    x = logp.clone().requires_grad_(True)
    cfg = GRPOLossConfig(surrogate="cispo", cispo_cap=1.2, correction="none")
    grpo_loss(x, old, adv, mask, cfg)[0].backward()
    n = mask.sum()
    ratio = torch.exp(logp - old)
    want = -torch.clamp(ratio, max=1.2) * adv[:, None] * mask / n     # d/dlogp of -sg(w) A logp / T
    assert torch.allclose(x.grad, want, rtol=1e-12, atol=0)
    assert x.grad[0, 0] != 0                   # ratio 1.65 > cap: CISPO still learns from the token
    # GSPO: one ratio per sequence; a sequence outside the clip range gets no gradient at all
    x = logp.clone().requires_grad_(True)
    cfg = GRPOLossConfig(ratio_level="sequence", aggregation="grpo", clip_low=0.05, clip_high=0.06,
                         correction="none")
    grpo_loss(x, old, adv, mask, cfg)[0].backward()
    seq_ratio = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    for i in range(3):
        outside = (seq_ratio[i] > 1.06 and adv[i] > 0) or (seq_ratio[i] < 0.95 and adv[i] < 0)
        assert bool((x.grad[i] == 0).all()) == bool(outside), i
    assert any((x.grad[i] == 0).all() for i in range(3)) and any((x.grad[i] != 0).any() for i in range(3))


def test_micro_batch_sums_over_the_summed_normaliser_are_the_whole_batch_loss():
    """Split the batch as micro-batches or processes would: the numerators over the summed
    normalisers give the whole batch's loss exactly."""
    from posttrain.train.grpo_loss import loss_normaliser, policy_loss
    logp, old, ref, rollout, mask, adv = _batch()
    for mode in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOLossConfig(aggregation=mode, max_completion_len=5, beta=0.02)
        whole, _ = grpo_loss(logp, old, adv, mask, cfg, ref, rollout)
        parts = [(policy_loss(logp[sl], old[sl], adv[sl], mask[sl], cfg, ref[sl], rollout[sl])[0],
                  loss_normaliser(mask[sl], mode, 5)) for sl in (slice(0, 1), slice(1, 3))]
        got = sum(p for p, _ in parts) / sum(n for _, n in parts)
        assert got.item() == pytest.approx(whole.item(), rel=1e-12)


def test_k3_is_the_unbiased_nonnegative_estimator():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.5, -0.9], dtype=torch.float64)
    got = k3_kl(lp, ref)
    for g_, a, b in zip(got.tolist(), lp.tolist(), ref.tolist()):
        assert g_ == pytest.approx(math.exp(b - a) - (b - a) - 1, rel=1e-12)
    assert got[0] == 0 and (got >= 0).all()


def test_group_advantages_scales_and_zero_std_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    adv, zero = group_advantages(r, 4, "group")
    assert zero.tolist() == [False, True, False]
    g0 = [1.0, 0.0, 0.0, 1.0]
    mean = sum(g0) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in g0) / 3)
    assert adv[:4].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in g0], rel=1e-6)
    assert adv[4:8].tolist() == [0.0] * 4
    none, _ = group_advantages(r, 4, "none")
    assert none[8:].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    batch, _ = group_advantages(r, 4, "batch")
    bstd = r.double().std().item()
    assert batch[8].item() == pytest.approx(1.0 / (bstd + 1e-4), rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(r[:10], 4)


def test_unscorable_samples_leave_the_baseline_and_get_zero_advantage():
    """NaN = every reward returned None: out of the group's mean and std, advantage 0 (TRL)."""
    nan = float("nan")
    r = torch.tensor([1.0, nan, 0.0, 0.5, nan, nan, 2.0, nan, nan, nan, nan, nan], dtype=torch.float64)
    adv, zero = group_advantages(r, 4, "group")
    g = [1.0, 0.0, 0.5]
    mean = sum(g) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 2)
    want = [(1.0 - mean) / (std + 1e-4), 0.0, (0.0 - mean) / (std + 1e-4), (0.5 - mean) / (std + 1e-4)]
    assert adv[:4].tolist() == pytest.approx(want, rel=1e-12)
    assert adv[4:].tolist() == [0.0] * 8      # one scored sample: no baseline; none scored: nothing
    assert zero.tolist() == [False, True, True]
    batch, _ = group_advantages(r, 4, "batch")
    bstd = r[~torch.isnan(r)].std().item()
    assert batch[0].item() == pytest.approx((1.0 - mean) / (bstd + 1e-4), rel=1e-12)
    assert not torch.isnan(batch).any()
    # the stage's batch std (summed over processes; one here) is the same number, also where
    # the rewards are large and close (a one-pass sum of squares would lose it)
    from posttrain.rollout.scoring import batch_reward_std

    assert batch_reward_std(r) == pytest.approx(bstd, rel=1e-12)
    big = 1e8 + torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert batch_reward_std(big) == pytest.approx(big.std().item(), rel=1e-9)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GRPOLossConfig(aggregation="mean").validate()
    with pytest.raises(ValueError):
        grpo_loss(*_batch()[:2], _batch()[5], _batch()[4], GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError):
        GRPOLossConfig(aggregation="dr_grpo").validate()        # no completion cap to divide by
    with pytest.raises(ValueError):
        GRPOLossConfig(correction="tis", correction_min=3.0, correction_max=2.0).validate()
    with pytest.raises(ValueError):
        GRPOLossConfig(correction="icepop", correction_level="sequence").validate()
