"""GRPO loss variants against a float64 hand computation on a small batch: clipping at both
bounds, the k3 KL, truncated importance sampling, the three aggregations, and advantages."""

import math

import pytest
import torch

from posttrain.train.grpo_loss import GRPOLossConfig, aggregate, group_advantages, grpo_loss, k3_kl


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


def _hand(logp, old, ref, rollout, mask, adv, cfg, S=None, T=None):
    per_seq, total, ntok = [], 0.0, 0
    for i in range(logp.shape[0]):
        s, n = 0.0, 0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            lp, o, r = float(logp[i, t]), float(old[i, t]), float(ref[i, t])
            rho = math.exp(lp - o)
            clipped = min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
            sur = min(rho * float(adv[i]), clipped * float(adv[i]))
            if cfg.tis_cap is not None:
                sur *= min(math.exp(o - float(rollout[i, t])), cfg.tis_cap)
            l = -sur
            if cfg.beta:
                d = r - lp
                l += cfg.beta * (math.exp(d) - d - 1)
            s += l
            n += 1
        per_seq.append((s, n))
        total += s
        ntok += n
    S = S or logp.shape[0]
    T = T or ntok
    if cfg.aggregation == "grpo":
        return sum(s / n for s, n in per_seq) / S
    if cfg.aggregation == "dapo":
        return total / T
    return total / (S * cfg.max_completion_len)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,tis", [(0.0, None), (0.04, None), (0.04, 1.5)])
def test_each_variant_equals_the_float64_hand_computation(aggregation, beta, tis):
    logp, old, ref, rollout, mask, adv = _batch()
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, beta=beta, aggregation=aggregation,
                         max_completion_len=7, tis_cap=tis).validate()
    loss, metrics = grpo_loss(logp, old, adv, mask, cfg, ref_logp=ref if beta else None,
                              rollout_logp=rollout if tis else None)
    assert loss.item() == pytest.approx(_hand(logp, old, ref, rollout, mask, adv, cfg), rel=1e-12)
    # the batch really exercises both clip bounds
    assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_low"] > 0
    if beta:
        assert metrics["kl"] > 0


def test_gradient_is_zero_where_the_clip_is_active_and_not_elsewhere():
    logp, old, _, _, mask, adv = _batch()
    logp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, adv, mask, GRPOLossConfig(aggregation="dapo", tis_cap=None))
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[0, 4] == 0      # A > 0, ratio above 1 + eps_high
    assert g[1, 0] == 0                       # A < 0, ratio below 1 - eps_low
    assert g[0, 1] != 0 and g[1, 1] != 0 and g[2, 2] != 0
    assert (g[mask == 0] == 0).all()


def test_micro_batch_shares_sum_to_the_whole_batch_loss():
    """Split the batch as two ranks would: the shares with global counts add up exactly."""
    logp, old, _, _, mask, adv = _batch()
    for mode in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOLossConfig(aggregation=mode, tis_cap=None, max_completion_len=5)
        whole, _ = grpo_loss(logp, old, adv, mask, cfg)
        T = int(mask.sum())
        parts = [grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], cfg, global_sequences=3, global_tokens=T)[0]
                 for sl in (slice(0, 1), slice(1, 3))]
        assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-12)


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


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GRPOLossConfig(aggregation="mean").validate()
    with pytest.raises(ValueError):
        grpo_loss(*_batch()[:2], _batch()[5], _batch()[4], GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum", 1, 1, 1)
