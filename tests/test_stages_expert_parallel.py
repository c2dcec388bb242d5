"""The stages under expert parallelism + FSDP2, launched as a user would (torchrun, 2 CPU
processes, gloo): `posttrain sft` with train.expert_parallel=2 takes the same steps as the
default DDP layout on the same data, resumes from its sharded training state exactly, and
exports an HF checkpoint that loads in one process; `posttrain rm` and `posttrain grpo` run
under EP=2, GRPO's first gradient equals the one-process run's, and its torch rollout engine
holds the trainer's gathered weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import small_args
from posttrain.model import load_checkpoint
from test_grpo_stage import _config_dict, policy_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))


def _launch(stage: str, config: Path, port: int, nproc: int = 2):
    """`posttrain <stage> --config F` ("rm train" is two words), under torchrun unless nproc == 1."""
    args = ["-m", "posttrain", *stage.split(), "--config", str(config)]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-6000:]
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, dtype=torch.float32)[0].state_dict()


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_ep")
    args = small_args(vocab_size=640, num_nextn_predict_layers=1)
    (d / "config.json").write_text(json.dumps(args.to_hf_config("float32")))
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i % 7}?"},
                          {"role": "assistant", "content": f"{i} + {i % 7} = {i + i % 7}. " * (1 + i % 3)}]}
            for i in range(64)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _sft_config(d: Path, out: Path, **train) -> Path:
    cfg = {"model": {"config": str(d / "config.json"), "tokenizer": "embedded"},
           "data": {"sources": [{"path": str(d / "data.jsonl")}], "max_length": 128, "cache_dir": str(d / "cache")},
           "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "report_to": ["jsonl"],
                     "progress": False, "bias_update_gamma": 0.01, **train},
           "output_dir": str(out)}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_under_expert_parallel_matches_ddp_and_resumes(sft_inputs, tmp_path):
    d = sft_inputs
    _launch("sft", _sft_config(d, tmp_path / "ddp"), 29541)
    ep_cfg = _sft_config(d, tmp_path / "ep", expert_parallel=2, activation_checkpointing=True, save_every=2)
    _launch("sft", ep_cfg, 29542)

    ddp, ep = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "ep")
    assert [r["step"] for r in ep] == [1, 2, 3]
    for a, b in zip(ddp, ep):  # same data, same start: the same losses, gradients and expert loads
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["expert_load_max_over_mean"] == pytest.approx(a["expert_load_max_over_mean"], rel=1e-6)
    w_ddp, w_ep = _weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "ep" / "final")
    assert ep[-1]["loss"] < ep[0]["loss"]
    for name, t in w_ddp.items():
        # Adam turns summation-order noise in near-zero gradients into full steps: compare norms
        assert _rel(w_ep[name], t) < 1e-3, name

    # the sharded training state: one file per process, and the layout recorded
    step2 = tmp_path / "ep" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in step2.glob("*-rank*.pt")) == [
        "model-rank00000.pt", "model-rank00001.pt", "optimizer-rank00000.pt", "optimizer-rank00001.pt"]
    assert json.loads((step2 / "state.json").read_text())["layout"] == {"world": 2, "expert_parallel": 2}

    # interrupted after step 2: resuming under the same layout reproduces the final weights
    final = _weights(tmp_path / "ep" / "final")
    shutil.rmtree(tmp_path / "ep" / "final")
    shutil.rmtree(tmp_path / "ep" / "checkpoints" / "step-00000003")
    (tmp_path / "ep" / "checkpoints" / "latest").write_text("step-00000002")
    _launch("sft", ep_cfg, 29543)
    resumed = _weights(tmp_path / "ep" / "final")
    for name, t in final.items():
        assert torch.equal(resumed[name], t), name
    assert [r["step"] for r in _metrics(tmp_path / "ep")] == [1, 2, 3]


def test_grpo_under_expert_parallel_matches_one_process(policy_dir, tmp_path):  # noqa: F811
    for name, train in (("one", {}), ("ep", {"expert_parallel": 2})):
        data = _config_dict(policy_dir, tmp_path / name, iterations=2, prompts_per_step=4, micro_batch_size=3,
                            dynamic_sampling=False)
        data["train"].update(save_every=0, **train)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    _launch("grpo", tmp_path / "one.yaml", 0, nproc=1)
    _launch("grpo", tmp_path / "ep.yaml", 29544)
    one, ep = _metrics(tmp_path / "one"), _metrics(tmp_path / "ep")
    assert [r["step"] for r in ep] == [1, 2]
    assert ep[0]["reward_mean"] == pytest.approx(one[0]["reward_mean"], abs=1e-9)  # the same samples
    assert ep[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    # after the first update the rollout copy was refreshed from the gathered weights: sampling
    # from them matches the one-process run's samples from its own updated policy
    assert ep[1]["reward_mean"] == pytest.approx(one[1]["reward_mean"], abs=1e-9)
    assert ep[1]["weight_sync_s"] > 0
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["accuracy_after"] is not None
    # the exported weights: Adam's sign-like first steps on near-zero gradients (rare tokens'
    # embedding rows) differ by summation order, so whole tensors agree to 1e-2, not 1e-5; a
    # misplaced expert range or a wrong gradient scale would be off by O(1)
    start = _weights(policy_dir)
    w_one, w_ep = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "ep" / "final")
    for name, t in w_one.items():
        assert _rel(w_ep[name], t) < 1e-2, name
    assert any(_rel(w_ep[k], start[k]) > 1e-3 for k in start if ".experts." in k)


def test_rm_under_expert_parallel_matches_ddp(policy_dir, tmp_path):  # noqa: F811
    """The reward model trains its new head and the trunk under EP=2 as under DDP, exports a
    checkpoint with the head, and evaluates the held-out pairs on the export."""
    from data_recipes.preference_data import pair_to_row
    from data_recipes.synthetic_pairs import synthetic_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_to_row(p)) + "\n" for p in synthetic_pairs(48, seed=4, style="short")))
    for name, train in (("ddp", {}), ("ep", {"expert_parallel": 2})):
        cfg = {"model": {"path": str(policy_dir)},
               "data": {"train": [{"path": str(data)}], "eval_fraction": 0.25, "max_length": 128},
               "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "report_to": ["jsonl"],
                         "progress": False, **train},
               "output_dir": str(tmp_path / name)}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        _launch("rm train", tmp_path / f"{name}.yaml", 29545 + len(name))
    ddp, ep = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "ep")
    assert [r["step"] for r in ep] == [1, 2, 3]
    for a, b in zip(ddp, ep):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    model, _ = load_checkpoint(tmp_path / "ep" / "final", dtype=torch.float32)
    assert model.score is not None
    for name in ("ddp", "ep"):
        assert json.loads((tmp_path / name / "eval" / "summary.json").read_text())["pairs"] == 12
