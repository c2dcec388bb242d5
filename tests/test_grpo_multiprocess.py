"""`posttrain grpo` under a 2-process launch (torchrun, gloo on CPU): each rank rolls out its
half of every prompt batch, the loss is normalised over the global batch, and the result is
the single-process run's: the same samples (seeds follow the prompt's place in the global
batch) and, from the same weights, the same gradient (its global norm is compared; weights
after several Adam steps are not, as Adam turns summation-order noise in near-zero gradients
into full-size steps). Advantages are scaled by the whole batch's std, which spans both
processes, as TRL gathers rewards before scaling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.model import load_checkpoint
from test_grpo_stage import _config_dict, policy_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.slow
def test_two_process_grpo_equals_one_process(policy_dir, tmp_path):  # noqa: F811
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    for name in ("one", "two"):
        data = _config_dict(policy_dir, tmp_path / name, iterations=3, prompts_per_step=4, micro_batch_size=3,
                            dynamic_sampling=False, advantage_scale="batch")
        data["train"]["save_every"] = 0
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    _run([sys.executable, "-m", "posttrain", "grpo", "--config", str(tmp_path / "one.yaml")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
          "-m", "posttrain", "grpo", "--config", str(tmp_path / "two.yaml")], env)

    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]                      # logged once, by the main process
    for a, b in zip(one, two):
        assert b["sequences"] == a["sequences"] == 16
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-9)   # the same samples
    # step 1 starts from the same weights: the loss normalised over the global batch gives the
    # same gradient however the sequences are split over ranks and micro-batches
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert two[0]["entropy"] == pytest.approx(one[0]["entropy"], rel=1e-4)
    b = torch.load(tmp_path / "two" / "checkpoints" / "step-00000003" / "model.pt")  # fp32 trainer state
    start, _ = load_checkpoint(policy_dir, dtype=torch.float32)
    assert max(float((v - start.state_dict()[k]).abs().max()) for k, v in b.items()) > 1e-3
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2


@pytest.mark.slow
def test_two_processes_refuse_a_users_directory_and_leave_it_alone(policy_dir, tmp_path):  # noqa: F811
    """Only the main process claims the output; when it refuses, the other exits too, having
    written nothing, and the report is the main process's one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    data = _config_dict(policy_dir, users, iterations=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "posttrain", "grpo", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.count("posttrain: error:") == 1 and "was not written by `posttrain grpo`" in out.stderr
    assert "Traceback" not in out.stderr.split("posttrain: error:")[0][-2000:]
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"] and (users / "notes.txt").read_text() == "mine"
