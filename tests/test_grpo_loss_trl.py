"""posttrain's GRPO losses equal TRL's on identical tensors: TRL's own `_compute_loss` runs
on a trainer whose log-prob function returns the test's tensors (no model), for every loss
posttrain shares with TRL: grpo / dapo / dr_grpo, the clip with DAPO's clip-higher, GSPO's
sequence-level ratio, CISPO, the k3 KL with and without bias correction, DeepSeek-V3.2's
off-policy sequence mask and TRL's four importance-sampling modes (the weights are computed
by posttrain and TRL's formula in the test, then handed to TRL's loss)."""

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.train.grpo_loss import GRPOLossConfig, grpo_loss
from posttrain.train.mismatch import correction_weights


@pytest.fixture(scope="module")
def trl_loss():
    """TRL's `_compute_loss` bound to a stand-in trainer (TRL imported here: it imports vLLM,
    which changes Triton's state for the tests that run after it)."""
    pytest.importorskip("trl")
    from accelerate import Accelerator
    from trl import GRPOTrainer

    accelerator = Accelerator(cpu=True)

    def run(logp, old, adv, mask, ref, is_ratio, loss_type, level, beta, bias_kl, eps_low, eps_high, L, opsm,
            sampling):
        t = GRPOTrainer.__new__(GRPOTrainer)
        t.__dict__.update(
            accelerator=accelerator, model=SimpleNamespace(training=False), loss_type=loss_type,
            importance_sampling_level=level, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
            max_completion_length=L, off_policy_mask_threshold=opsm, top_entropy_quantile=1.0,
            use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
            aux_loss_enabled=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
            args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None),
            _metrics={"train": __import__("collections").defaultdict(list),
                      "eval": __import__("collections").defaultdict(list)})
        t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
        inputs = {"prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
                  "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
                  "completion_ids": torch.zeros(logp.shape, dtype=torch.long), "completion_mask": mask,
                  "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
        if beta:
            inputs["ref_per_token_logps"] = ref
        if is_ratio is not None:
            inputs["importance_sampling_ratio"] = is_ratio
        if sampling is not None:
            inputs["sampling_per_token_logps"] = sampling
        return GRPOTrainer._compute_loss(t, None, inputs)

    return run


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    rollout = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, ref, rollout, mask, adv


def _trl_is_ratio(old, rollout, mask, mode, lo, hi):
    """TRL's vllm importance-sampling weights (grpo_trainer's formula)."""
    diff = torch.nan_to_num((old - rollout) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    w = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(w, min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return w.masked_fill((w < lo) | (w > hi), 0.0)


CASES = [  # (posttrain loss options, TRL loss_type, TRL importance_sampling_level)
    (dict(aggregation="grpo"), "grpo", "token"),
    (dict(aggregation="dapo"), "dapo", "token"),
    (dict(aggregation="dr_grpo", max_completion_len=11), "dr_grpo", "token"),
    (dict(aggregation="dapo", clip_low=0.1, clip_high=0.1), "dapo", "token"),
    (dict(aggregation="grpo", ratio_level="sequence", clip_low=0.03, clip_high=0.04), "grpo", "sequence"),
    (dict(aggregation="dapo", surrogate="cispo", cispo_cap=1.1), "cispo", "token"),
    (dict(aggregation="grpo", beta=0.05), "grpo", "token"),
    (dict(aggregation="grpo", beta=0.05, kl_bias_correction=True), "grpo", "token"),
    (dict(aggregation="dapo", beta=0.05, kl_bias_correction=True, off_policy_mask=0.02), "dapo", "token"),
]
IS_MODES = [(None, None, None), ("tis", "token", "token_truncate"), ("tis", "sequence", "sequence_truncate"),
            ("mis", "token", "token_mask"), ("mis", "sequence", "sequence_mask"), ("icepop", "token", "token_mask")]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[1] + "-" + ",".join(f"{k}={v}" for k, v in c[0].items()))
@pytest.mark.parametrize("is_mode", IS_MODES, ids=lambda m: m[2] or "no-IS")
def test_loss_and_gradient_equal_trls(trl_loss, case, is_mode, seed):
    options, loss_type, level = case
    correction, corr_level, trl_mode = is_mode
    logp, old, ref, rollout, mask, adv = _batch(seed)
    cfg = GRPOLossConfig(clip_low=options.pop("clip_low", 0.2), clip_high=options.pop("clip_high", 0.28),
                         correction=correction or "none", correction_level=corr_level or "token",
                         **({"correction_min": 0.7, "correction_max": 1.3} if correction == "mis" else {}),
                         **options).validate()
    lo, hi = cfg.correction_bounds() if correction else (None, None)
    ours_logp = logp.clone().requires_grad_(True)
    ours, _ = grpo_loss(ours_logp, old, adv, mask, cfg, ref_logp=ref, rollout_logp=rollout if correction else None)
    ours.backward()

    is_ratio = None
    if correction:
        is_ratio = _trl_is_ratio(old, rollout, mask, trl_mode, None if lo == -math.inf else lo,
                                 None if hi == math.inf else hi)
        assert torch.equal(correction_weights(old, rollout, mask, cfg), is_ratio)
    theirs_logp = logp.clone().requires_grad_(True)
    eps_high = cfg.cispo_cap if cfg.surrogate == "cispo" else cfg.clip_high
    theirs = trl_loss(theirs_logp, old, adv, mask, ref, is_ratio, loss_type, level, cfg.beta, cfg.kl_bias_correction,
                      cfg.clip_low, eps_high, cfg.max_completion_len, cfg.off_policy_mask,
                      rollout if cfg.off_policy_mask is not None and correction else None)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(ours_logp.grad, theirs_logp.grad, rtol=1e-10, atol=1e-15)
