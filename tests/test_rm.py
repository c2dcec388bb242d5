"""Reward models: saved and reloaded scores, padding and batch invariance, `rm eval` on real
HH-RLHF data, serving over HTTP, pairs from the distillation stage, and learning a real signal."""

import json
import threading

import pytest
import torch

from data_recipes.preference_data import pair_to_row, pairs_from_distillation
from data_recipes.synthetic_pairs import synthetic_pairs
from posttrain.cli import main
from posttrain.embedded import build_tokenizer
from posttrain.model import ModelArgs, Transformer, save_checkpoint
from posttrain.paths import model_config
from reward.model_reward import HTTPReward, ModelReward, RewardModelScorer
from reward.reward_server import make_server
from tests.helpers import randomize_



@pytest.fixture(scope="module")
def HH(shared_data):
    return shared_data / "hh_harmless_test.jsonl.gz"


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A random tiny reward model saved as a checkpoint (weights far from init, so scores vary)."""
    torch.manual_seed(0)
    args = ModelArgs.from_json(model_config("tiny"))
    model = randomize_(Transformer(args, scalar_head=True), seed=3, std=0.05).eval()
    tok = build_tokenizer(args.vocab_size)
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_checkpoint(model, args, path, tokenizer=tok)
    (path / "reward_model.json").write_text(json.dumps({"max_length": 256}))
    return path, model, tok


def _conversations(n):
    return [[{"role": "user", "content": f"What is {i} + {i + 1}?"},
             {"role": "assistant", "content": f"It is {2 * i + 1 + i % 3}." + " Let me explain." * (i % 4)}]
            for i in range(n)]


def test_saved_rm_gives_the_same_scores_and_ignores_padding_side_and_batch(rm_dir):
    path, model, tok = rm_dir
    convs = _conversations(7)
    loaded = RewardModelScorer(path, batch_size=3)
    in_memory = RewardModelScorer(model=model, tokenizer=tok, batch_size=7)
    a, b = loaded.score_conversations(convs), in_memory.score_conversations(convs)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert max(a) - min(a) > 1e-2  # the scores differ between conversations: the checks below can fail
    alone = [in_memory.score_conversations([c])[0] for c in convs]
    assert torch.allclose(torch.tensor(alone), torch.tensor(b), atol=1e-5)
    # left padding, positions counted over the mask, same scores
    ids = [loaded.encode(c) for c in convs]
    T = max(map(len, ids))
    left = torch.full((len(ids), T), tok.pad_token_id)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, s in enumerate(ids):
        left[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    with torch.no_grad():
        left_scores = model.score_sequences(left, mask)
    assert torch.allclose(left_scores, torch.tensor(b), atol=1e-5)


def test_model_reward_and_http_reward_give_the_same_scores(rm_dir):
    path, _, _ = rm_dir
    rm = ModelReward(path, batch_size=4)
    prompts = ["What is 2 + 3?", [{"role": "user", "content": "What is 4 * 2?"}], "Hi"]
    completions = ["5", [{"role": "assistant", "content": "8"}], "Hello there."]
    local = rm(prompts, completions)
    server = make_server(rm, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        remote = HTTPReward(url, batch_size=2)(prompts, completions)
        assert remote == pytest.approx(local, abs=1e-6)
        with pytest.raises(RuntimeError, match="400"):
            HTTPReward(url)(["a", "b"], ["only one"] * 1)  # mismatched lengths: a clear error
    finally:
        server.shutdown()


def test_rm_eval_runs_on_hh_rlhf_and_reports_skipped_pairs(rm_dir, tmp_path, capsys, HH):
    path, _, _ = rm_dir
    out = tmp_path / "eval"
    code = main(["rm", "eval", "--model", str(path), "--data", str(HH), "--out", str(out), "--limit", "60",
                 "--max-length", "160"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    scored = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    skipped = [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(scored) > 0 and summary["skipped"] == len(skipped) > 0
    assert summary["pairs"] + summary["skipped"] == 60
    assert all(s["reason"].startswith("overlong") for s in skipped)
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in scored) / len(scored))
    assert (out / "report.png").stat().st_size > 10_000
    assert "accuracy" in capsys.readouterr().out


def test_pairs_from_the_distillation_stage_are_verified_vs_wrong(tmp_path):
    from data_recipes.distill_filters import FilterConfig
    from data_recipes.prompt_sets import synthetic_prompts
    from posttrain.embedded.teacher import ScriptedTeacher
    from posttrain.engines import SamplingConfig
    from posttrain.stages.distill_filter import run_filter
    from posttrain.stages.distill_generate import generate

    prompts = synthetic_prompts(40, seed=5)
    generate(prompts, ScriptedTeacher(), SamplingConfig(n=4, max_tokens=4096, seed=1), tmp_path / "gen",
             progress=False)
    run_filter(tmp_path / "gen", tmp_path / "filt", FilterConfig(keep_per_prompt=4))
    pairs = pairs_from_distillation(tmp_path / "filt")
    assert len(pairs) >= 5
    gold = {p.id: p.columns["answer"] for p in prompts}
    import reward

    check = reward.get("math")
    for pair in pairs:
        answer = gold[pair.id.split("#")[0]]
        assert check(None, [pair.chosen[0]["content"]], answer=[answer]) == [1.0]
        assert check(None, [pair.rejected[0]["content"]], answer=[answer]) == [0.0]
        assert pair.prompt[-1]["role"] == "user"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 4 minutes alone on 2 cores; more on a busy machine
def test_tiny_rm_learns_to_tell_correct_from_wrong_final_answers(tmp_path):
    """CPU, as the report does it: SFT first, then the reward model from the SFT checkpoint.
    A wrong final answer (one the worked steps do not support: a slip, a slip in the tens, the
    last operation misread) must rank below the correct one on held-out problems >= 90% of the
    time. A two-layer model on the steps-only form of the traces keeps this to minutes."""
    from posttrain.stages.rm_train import rm_config, run_rm_train
    from posttrain.stages.sft import run_sft, sft_config

    micro = json.loads(model_config("tiny").read_text())
    micro.update(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=64,
                 kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                 num_nextn_predict_layers=0)
    (tmp_path / "micro.json").write_text(json.dumps(micro))
    sft_rows = synthetic_pairs(3000, seed=2, style="short")  # disjoint seed: SFT sees other problems
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": p.prompt + p.chosen}) + "\n"
                                                for p in sft_rows))
    run_sft(sft_config({
        "model": {"config": str(tmp_path / "micro.json"), "tokenizer": "embedded"},
        "data": {"sources": [{"path": str(tmp_path / "sft.jsonl")}], "max_length": 512,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 600, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10,
                  "weight_decay": 0.0, "report_to": ["jsonl"], "progress": False},
        "output_dir": str(tmp_path / "sft")}))
    pairs = synthetic_pairs(6000, seed=1, style="short")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_to_row(p)) + "\n" for p in pairs))
    result = run_rm_train(rm_config({
        "model": {"path": str(tmp_path / "sft" / "final")},
        "data": {"train": [{"path": str(data)}], "eval_fraction": 0.2, "max_length": 256},
        # 800 steps sat at the edge: 0.80 or >= 0.9 held-out depending on the CPU's rounding;
        # 1200 and 1600 reach 0.974 and 0.977 on the same data
        "train": {"max_steps": 1200, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5,
                  "weight_decay": 0.0, "report_to": ["jsonl"], "progress": False},
        "output_dir": str(tmp_path / "run")}))
    assert result["eval"]["pairs"] == 1200
    assert result["eval"]["accuracy"] >= 0.9, result["eval"]
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(summary["per_subset"]) == {"1-op", "2-op"}
    # the saved model scores the held-out pairs as the in-process evaluation did
    scorer = RewardModelScorer(tmp_path / "run" / "final")
    first = json.loads((tmp_path / "run" / "eval" / "scores.jsonl").read_text().splitlines()[0])
    pair = next(p for p in pairs if p.id == first["id"])
    again = scorer.score_conversations([pair.prompt + pair.chosen, pair.prompt + pair.rejected])
    assert again == pytest.approx([first["chosen_score"], first["rejected_score"]], abs=1e-4)


def test_rm_train_cli_with_lora_trains_adapters_and_the_head(tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    pairs = synthetic_pairs(40, seed=4, style="short")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_to_row(p)) + "\n" for p in pairs))
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"config": str(model_config("tiny")), "tokenizer": "embedded"},
        "data": {"train": [{"path": str(data)}], "eval_fraction": 0.25, "max_length": 128},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "report_to": ["jsonl"], "progress": False},
        "output_dir": str(tmp_path / "run")}))
    assert main(["rm", "train", "--config", str(config), "train.seed=3"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["pairs"] == 10
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in saved), "the new head is trained and saved with the adapter"
    assert len(RewardModelScorer(tmp_path / "run" / "final").score_conversations(
        [pairs[0].prompt + pairs[0].chosen])) == 1
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("accuracy" in m for m in metrics)
