"""GRPO's batches in the training loop: a padding micro-batch (a process with fewer
micro-batches than another) takes part in backward and adds nothing; its balance term does not
dilute the others'; every iteration's rollout metrics and evaluations reach metrics.jsonl
whatever train.log_every and grpo.updates_per_batch are."""

import json

import torch

from helpers import randomize_, small_args
from posttrain.model import Transformer
from posttrain.rollout import Rollout
from posttrain.rollout.batch import collate_rollouts, empty_batch
from posttrain.train.grpo_loss import GRPOLossConfig
from posttrain.train.grpo_objective import GRPOObjective
from test_grpo_stage import _config_dict, policy_dir  # noqa: F401  (fixture)


def _batch(model, pad=0):
    """Two rollouts with the engine's log-probs (a correction and the gap metrics apply)."""
    g = torch.Generator().manual_seed(4)
    rs = [Rollout("p", "q", torch.randint(3, 90, (5,), generator=g).tolist(),
                  torch.randint(3, 90, (n,), generator=g).tolist(), "", "stop",
                  (-torch.rand(n, generator=g) - 1.0).tolist(), advantage=a)
          for n, a in ((4, 1.0), (6, -0.5))]
    b = collate_rollouts(rs, pad, False, None)
    with torch.no_grad():
        b["old_logp"] = model.token_logprobs(b["input_ids"], b["attention_mask"], b["completion"])[0]
    return b


def test_a_padding_micro_batch_takes_part_in_backward_and_adds_nothing():
    args = small_args(aux_loss_alpha=0.0)          # no balance loss to carry the graph
    model = randomize_(Transformer(args), seed=3).train()
    obj = GRPOObjective(GRPOLossConfig(aggregation="dapo"), temperature=1.0)
    pad = empty_batch(0, None)
    with torch.no_grad():
        pad["old_logp"] = torch.zeros_like(pad["loss_mask"])
    parts, metrics = obj(model, pad)
    assert obj.normaliser(pad) == 0 and not obj.counts_for_mean(pad)
    assert parts.total.requires_grad and float(parts.total.detach()) == 0.0
    parts.total.backward()                          # raised before: no graph
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() == 0
    real = _batch(model)
    assert real["rollout_logp"] is not None and real["rollout_logp"].nan_to_num().abs().sum() > 0
    _, real_metrics = obj(model, real)
    assert "correction_weight_mean" in real_metrics
    assert set(metrics) == set(real_metrics)        # every micro-batch reports the same keys


def test_rollout_metrics_and_evaluations_are_logged_every_iteration(policy_dir, tmp_path):  # noqa: F811
    from posttrain.stages.grpo import grpo_config, run_grpo

    data = _config_dict(policy_dir, tmp_path / "run", iterations=3, updates_per_batch=2)
    data["train"].update(log_every=4, save_every=2)
    data["eval_every"] = 1
    run_grpo(grpo_config(data))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with_rollouts = [r["step"] for r in rows if "reward_mean" in r]
    assert with_rollouts == [1, 3, 5]                     # the first update of each iteration
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4]   # after iterations 1 and 2
    assert rows[-1]["step"] == 6
