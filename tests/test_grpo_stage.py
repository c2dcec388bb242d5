"""The GRPO stage end to end on a small random model (torch-engine rollouts): metrics, report
files, a changed policy, and a run killed with SIGKILL then resumed that ends with the weights
of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.embedded import build_tokenizer
from posttrain.model import ModelArgs, Transformer, load_checkpoint, save_checkpoint
from posttrain.paths import model_config


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    cfg = json.loads(model_config("tiny").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    args = ModelArgs.from_hf_config(cfg)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "sft"
    save_checkpoint(Transformer(args), args, path, tokenizer=build_tokenizer(args.vocab_size))
    return path


def _config_dict(policy_dir, out, iterations=3, **grpo) -> dict:
    return {
        "model": {"path": str(policy_dir)},
        "prompts": {"source": "synthetic", "limit": 16, "level": {"min_ops": 1, "max_ops": 1, "max_operand": 5},
                    "eval_limit": 4},
        # a custom reward from the user's code (module:function) that varies for random text,
        # so groups carry signal
        "rewards": {"helpers:digit_share": 1.0, "math": 1.0},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 12, "micro_batch_size": 5,
                 "mask_truncated": False,  # an untrained policy never stops by itself
                 "loss": {"beta": 0.05, "aggregation": "dapo"}, **grpo},
        "iterations": iterations,
        "train": {"lr": 5e-3, "min_lr": 5e-3, "weight_decay": 0.0, "save_every": 1, "report_to": ["jsonl"],
                  "progress": False},
        "output_dir": str(out)}


def _config(policy_dir, out, iterations=3, **grpo):
    from posttrain.stages.grpo import grpo_config

    return grpo_config(_config_dict(policy_dir, out, iterations, **grpo))


def test_grpo_runs_logs_and_changes_the_policy(policy_dir, tmp_path):
    from posttrain.stages.grpo import run_grpo

    summary = run_grpo(_config(policy_dir, tmp_path / "run"))
    assert summary["engine"] == "torch" and summary["iterations"] == 3
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and summary["accuracy_before"] is not None
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward/helpers:digit_share", "reward/math", "zero_std_group_frac", "response_len_mean",
                "rollout_s", "train_s", "weight_sync_s", "entropy", "kl", "clip_frac_low", "clip_frac_high"):
        assert key in rows[-1], key
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 5000
    before, _ = load_checkpoint(policy_dir)
    after, _ = load_checkpoint(tmp_path / "run" / "final")
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any("self_attn" in k for k in changed)


def _launch(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # one thread: bitwise-reproducible CPU kernels for the comparison
    return subprocess.Popen([sys.executable, "-m", "posttrain", "grpo", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_grpo_killed_with_sigkill_resumes_to_the_uninterrupted_weights(policy_dir, tmp_path):
    import yaml

    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(yaml.safe_dump(_config_dict(policy_dir, tmp_path / name, iterations=5, max_refills=0)))
    full = _launch(runs["full"])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]

    victim = _launch(runs["killed"])
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    # an iteration of this tiny run can take well under a second, and a busy machine may not
    # run this loop that often: kill at the first checkpoint seen from step 2 on, mid-run
    mid_run = {f"step-{s:08d}" for s in (2, 3, 4)}
    while time.time() < deadline and victim.poll() is None:
        if latest.exists() and latest.read_text().strip() in mid_run:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)  # mid-run: the next step is being rolled out
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()

    resumed = _launch(runs["killed"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    a, _ = load_checkpoint(tmp_path / "full" / "final")
    b, _ = load_checkpoint(tmp_path / "killed" / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    rows = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # the killed step is logged once, by the resumed run


def test_grpo_with_routing_replay_runs_the_policy_on_the_engines_experts(tmp_path):
    """R3 with the torch engine on a policy whose routing sits near ties: the logged gap between
    the engine's log-probs and the trainer's stays within 1e-3 at every step (without replay it
    is above 1e-2 at the first), and the policy still learns."""
    from posttrain.stages.grpo import grpo_config, run_grpo
    from test_routing_replay import _tiny

    path = _tiny(tmp_path / "ties", 1e-5)
    gaps = {}
    for replay in ("none", "r3"):
        data = _config_dict(path, tmp_path / replay, iterations=2, routing_replay=replay, max_new_tokens=24)
        run_grpo(grpo_config(data))
        rows = [json.loads(l) for l in (tmp_path / replay / "metrics.jsonl").read_text().splitlines()]
        gaps[replay] = [r["engine_logp_gap_max"] for r in rows]
    assert gaps["none"][0] > 1e-2, gaps
    assert max(gaps["r3"]) <= 1e-3, gaps
    before, _ = load_checkpoint(path)
    after, _ = load_checkpoint(tmp_path / "r3" / "final")
    assert any(not torch.equal(v, before.state_dict()[k]) for k, v in after.state_dict().items()
               if k.endswith("gate.weight"))   # the router learns through the replayed gate weights
