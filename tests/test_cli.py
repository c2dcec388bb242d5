"""The `posttrain` command as a user runs it: help, model info, demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main as cli
from posttrain.model import ModelArgs, Transformer, load_checkpoint
from posttrain.model.counting import count_parameters, kv_cache_bytes_per_token

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_stages():
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "--help"], capture_output=True, text=True, check=True)
    assert "model" in out.stdout and "demo" in out.stdout


def test_model_info_671B_matches_the_report(capsys):
    """Report: 671B total, 37B activated; MTP adds ~14B to the 685B checkpoint."""
    assert cli(["model", "info", str(ROOT / "configs/model/671B.json"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    p = info["params"]
    assert abs(p["total"] / 671e9 - 1) < 0.01, p["total"]
    # 36.63B counted exactly (1.0% under 37B); the report rounds it to "37B"
    assert round(p["active"] / 1e9) == 37 and abs(p["active"] / 37e9 - 1) < 0.015, p["active"]
    assert abs(p["total_with_mtp"] / 685e9 - 1) < 0.01, p["total_with_mtp"]
    assert 11e9 < p["mtp"] < 12e9
    kv = info["kv_cache_bytes_per_token"]
    assert kv["mla"] == (512 + 64) * 61 * 2
    assert kv["mha"] == 128 * (192 + 128) * 61 * 2


def test_model_info_236B_matches_the_v2_report(capsys):
    """DeepSeek-V2: 236B total, 21B activated."""
    assert cli(["model", "info", str(ROOT / "configs/model/236B.json"), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["params"]
    assert abs(p["total"] / 236e9 - 1) < 0.01, p["total"]
    assert abs(p["active"] / 21e9 - 1) < 0.01, p["active"]


@pytest.mark.parametrize("name", ["tiny", "16B"])
def test_counts_equal_the_built_model(name):
    args = ModelArgs.from_json(ROOT / f"configs/model/{name}.json")
    if name != "tiny":  # build a shallow copy of the big config: counts are per layer
        args.num_hidden_layers, args.vocab_size = 2, 1000
    with torch.device("meta"):
        model = Transformer(args)
    c = count_parameters(args)
    assert c.total == model.num_parameters(include_mtp=False)
    assert c.mtp == model.num_parameters() - model.num_parameters(include_mtp=False)


def test_model_info_human_output(capsys):
    assert cli(["model", "info", str(ROOT / "configs/model/671B.json")]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "MLA 70,272 B" in out


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_sise": 3}))
    assert cli(["model", "info", str(tmp_path)]) == 2
    assert "unknown config field" in capsys.readouterr().err


@pytest.mark.timeout(2400)  # the whole demo: SFT from random weights, then GRPO, take minutes on 2 cores
def test_demo_writes_summary_and_a_loadable_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    m = summary["model"]
    assert set(m) == {"params_total", "params_active", "forward_backward_s", "generate_tokens_per_s"}
    assert m["params_total"] > m["params_active"] > 0
    assert 0 < m["forward_backward_s"] < 5 and m["generate_tokens_per_s"] > 0
    model, args = load_checkpoint(tmp_path / "checkpoints" / "init", dtype=torch.float32)
    assert args == ModelArgs.from_json(ROOT / "configs/model/tiny.json")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "init")
    assert len(tok) <= args.vocab_size
    r = summary["reward"]
    assert r["agree_with_truth"] == r["scored"] == 60 and r["format_ok"] == 40
    d = summary["distill"]
    assert d["kept"] + sum(d["rejected"].values()) == d["generated"] > 0
    assert d["rejected"]["wrong_answer"] > 0 and d["sft_rows"] == d["kept"]
    sft_rows = [json.loads(l) for l in (tmp_path / "distill" / "sft.jsonl").read_text().splitlines()]
    assert len(sft_rows) == d["kept"] and sft_rows[0]["messages"][-1]["role"] == "assistant"
    # SFT: from random weights to a model that solves most held-out problems, greedily
    s = summary["sft"]
    assert s["heldout"] == 100 and s["accuracy_before"] <= 0.02
    # 59-95% across machines (README); from 0%, half the problems is learning, not chance
    assert s["accuracy_after"] >= 0.5, s
    assert s["train_tokens_per_s"] > 0 and s["wall_s"] > 0
    model, _ = load_checkpoint(tmp_path / "sft" / "final", dtype=torch.float32)
    # the reward model, trained from the SFT checkpoint on verified-vs-wrong distillation pairs
    rm = summary["rm"]
    assert rm["pairs_train"] > 0 and rm["pairs_eval"] > 0 and 0.0 <= rm["heldout_accuracy"] <= 1.0
    assert (tmp_path / "rm" / "eval" / "report.png").exists()
    # GRPO from the SFT checkpoint: same held-out set and decoding as the SFT figure
    g = summary["grpo"]
    assert g["engine"] in ("torch", "vllm") and g["wall_s"] > 0
    assert g["accuracy_before"] == pytest.approx(s["accuracy_after"], abs=0.03)  # vLLM vs torch greedy
    # GRPO raised held-out accuracy in every run of this config (+5 to +17 points), but one run
    # is noisy; a collapse (seen with other optimiser settings: -40 points) fails here
    assert g["accuracy_after"] >= g["accuracy_before"] - 0.02, g
    assert (tmp_path / "grpo" / "reward_curve.png").stat().st_size > 5000
    assert "not_built_yet" not in summary
