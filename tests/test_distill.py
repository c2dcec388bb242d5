"""Distillation end to end: resumable generate, filters on real data, decontamination, bad input, export."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_recipes.distill_filters import FilterConfig, filter_records
from data_recipes.prompt_sets import load_prompts
from posttrain.cli import main as cli
from posttrain.stages.distill_filter import run_filter

ROOT = Path(__file__).resolve().parents[1]
GEN = [sys.executable, "-m", "posttrain.cli", "distill", "generate", "--prompts", "synthetic", "--limit", "60",
       "--n", "3", "--engine", "scripted", "--chunk-size", "5", "--seed", "3"]


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for p in sorted((out / "shards").glob("gen-*.jsonl")) for l in p.read_text().splitlines()]


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(GEN + ["--out", str(ref)], check=True, capture_output=True, cwd=ROOT)
    # a slow teacher, killed at a random point after it has written some shards
    proc = subprocess.Popen(GEN + ["--out", str(run), "--latency", "0.05"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((run / "shards").glob("gen-*.jsonl"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((run / "shards").glob("gen-*.jsonl")))
    assert 2 <= partial < 12, partial
    out = subprocess.run(GEN + ["--out", str(run)], check=True, capture_output=True, text=True, cwd=ROOT)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["shards_resumed"] == partial and summary["samples"] == 180
    got, want = _records(run), _records(ref)
    assert got == want
    assert len({r["id"] for r in got}) == 180


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    args = ["distill", "generate", "--prompts", "synthetic", "--limit", "4", "--n", "1", "--out", str(tmp_path)]
    assert cli(args) == 0
    assert cli(args[:-2] + ["--temperature", "0.9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("posttrain: error:") and "sampling.temperature" in err and "--restart" in err
    assert cli(args[:-2] + ["--temperature", "0.9", "--out", str(tmp_path), "--restart"]) == 0


def _math500_r1(rows, alter=False, truncate=False, mix=False):
    out = []
    for i, r in enumerate(rows):
        solution = r["solution"]
        if alter:
            solution = solution.replace("\\boxed{" + r["answer"] + "}", "\\boxed{" + r["answer"] + " + 1}")
        text = f"<think>\n{r['problem']}\nLet me verify my approach before answering.\n{solution}\n</think>\n\n{solution}"
        finish = "stop"
        if truncate:
            text, finish = text[: len(text) // 2], "length"
        if mix:
            text = text.replace("<think>\n", "<think>\n让我们仔细检查这个问题的每一个步骤，确认所有计算都是正确的。我们需要重新计算。"
                                                "这一步看起来是对的。然后继续检查下一步的结果，直到最后。\n")
        out.append({"id": f"{r['unique_id']}#0", "prompt_id": r["unique_id"], "sample_idx": 0, "task": "math",
                    "problem": r["problem"], "completion": text, "finish_reason": finish, "answer": r["answer"]})
    return out


@pytest.fixture(scope="module")
def math500(shared_data):
    records, rejects = load_prompts("math500")
    assert len(records) == 500 and rejects == []
    rows = [json.loads(l) for l in open(shared_data / "math500_test.jsonl")]
    return rows


def test_filters_on_math500_reference_solutions(math500):
    rows = [r for r in math500 if "\\boxed{" + r["answer"] + "}" in r["solution"]][:120]
    cfg = FilterConfig(near_dup_threshold=None, max_repetition=0.6)
    kept, rejects, _ = filter_records(_math500_r1(rows), cfg)
    assert len(kept) >= 0.97 * len(rows), [r["reject_reason"] for r in rejects][:10]
    kept, rejects, _ = filter_records(_math500_r1(rows, alter=True), cfg)
    assert kept == [] and {r["reject_reason"] for r in rejects} == {"wrong_answer"}
    kept, rejects, _ = filter_records(_math500_r1(rows[:20], truncate=True), cfg)
    assert kept == [] and {r["reject_reason"] for r in rejects} == {"truncated"}
    kept, rejects, _ = filter_records(_math500_r1(rows[:20], truncate=True), FilterConfig(require_stop=False))
    assert {r["reject_reason"] for r in rejects} <= {"unclosed_think"}
    kept, rejects, _ = filter_records(_math500_r1(rows[:20], mix=True), cfg)
    assert kept == [] and {r["reject_reason"] for r in rejects} == {"language_mixing"}


def test_decontamination_removes_a_planted_math500_problem(math500):
    planted = math500[123]
    train = [{"id": f"t{i}#0", "prompt_id": f"t{i}", "task": None, "finish_reason": "stop",
              "problem": f"A store sells {i} apples for {i + 3} dollars. How much do {2 * i} apples cost at that rate?",
              "completion": f"<think>ratio {i}</think>\nIt costs {2 * i + 6} dollars in total for problem {i}."}
             for i in range(30)]
    train.append({"id": "copy#0", "prompt_id": "copy", "task": None, "finish_reason": "stop",
                  "problem": "Here is a problem: " + planted["problem"], "completion": "<think>x</think>\nanswer"})
    kept, rejects, _ = filter_records(train, FilterConfig(decontaminate=["math500"], near_dup_threshold=None))
    assert [r["prompt_id"] for r in rejects] == ["copy"] and rejects[0]["reject_reason"] == "contaminated"
    assert len(kept) == 30


def test_rejection_sampling_pass_rate_and_duplicates(tmp_path):
    recs = []
    for p in range(3):
        for j in range(4):
            right = j < p + 1  # prompt 0: 1/4 right, prompt 1: 2/4, prompt 2: 3/4
            answer = "7" if right else "8"
            recs.append({"id": f"p{p}#{j}", "prompt_id": f"p{p}", "sample_idx": j, "task": "math", "answer": "7",
                         "problem": f"problem {p}", "finish_reason": "stop", "completion_tokens": 10 + j,
                         "completion": f"<think>Working on problem {p}, variant {j}: wait, let me verify. "
                                       f"{'x ' * j}</think>\n\\boxed{{{answer}}}"})
    recs.append(dict(recs[0], id="p0#9", sample_idx=9))  # an exact copy of a kept sample
    kept, rejects, rates = filter_records(recs, FilterConfig(keep_per_prompt=2, max_pass_rate=0.6))
    assert rates["p0"] == pytest.approx(2 / 5) and rates["p2"] == 0.75
    reasons = {r["id"]: r["reject_reason"] for r in rejects}
    assert reasons["p0#9"] == "duplicate"
    assert all(reasons[f"p2#{j}"] in ("pass_rate_out_of_range", "wrong_answer") for j in range(4))
    assert sorted(r["id"] for r in kept) == ["p0#0", "p1#0", "p1#1"]
    assert all(r["reflection_markers"] >= 2 for r in kept)


def test_bad_input_corpus_for_generate(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    good = {"problem": "Compute 2 + 3.", "answer": "5"}
    lines = [json.dumps(good).encode(), b"{broken json", json.dumps({"answer": "1"}).encode(),
             json.dumps({"problem": 42, "answer": "1"}).encode(), json.dumps({"problem": "   ", "answer": "1"}).encode(),
             b"\xff\xfe\xfa", json.dumps(["a", "list"]).encode(),
             json.dumps({"problem": "Compute 1 + 1.", "answer": {"x": 1}}).encode(),
             json.dumps({"problem": "Compute 4 + 4. " + "pad " * 3000, "answer": "8"}).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "gen"
    ckpt = tmp_path / "ckpt"
    import torch

    from posttrain.embedded import build_tokenizer
    from posttrain.model import ModelArgs, Transformer, save_checkpoint
    from posttrain.paths import model_config

    args = ModelArgs.from_json(model_config("tiny"))
    save_checkpoint(Transformer(args), args, ckpt, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    rc = cli(["distill", "generate", "--prompts", str(src), "--map", "problem=problem", "--map", "answer=answer",
              "--map", "task=math", "--engine", "torch", "--model", str(ckpt), "--n", "1", "--max-tokens", "4",
              "--temperature", "0", "--out", str(out)])
    assert rc == 0
    rejects = [json.loads(l) for l in (out / "prompt_rejects.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for r in rejects]
    assert any("invalid JSON" in r for r in reasons) and any("missing field 'problem'" in r for r in reasons)
    assert any("must be a string" in r for r in reasons) and "empty problem" in reasons
    assert "not UTF-8" in reasons and any("JSON object" in r for r in reasons)
    assert any("field 'answer' must be a string or number" in r for r in reasons)
    assert any("exceeds the engine's context" in r for r in reasons)
    assert len(rejects) == 8
    assert len(_records(out)) == 1


def test_bad_input_corpus_for_filter(tmp_path):
    good = {"prompt_id": "a", "problem": "Compute 2 + 3.", "completion": "<think>2 + 3 = 5</think>\n\\boxed{5}",
            "answer": "5"}
    lines = [json.dumps(good).encode(), b"not json at all", json.dumps({"problem": "x", "prompt_id": "b"}).encode(),
             json.dumps({"problem": "x", "prompt_id": "c", "completion": ["not", "text"]}).encode(),
             b"\xc3\x28 invalid utf8", json.dumps(3).encode()]
    src = tmp_path / "gen.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    summary = run_filter(src, tmp_path / "f", FilterConfig())
    assert summary["kept"] == 1 and summary["rejected"] == 5
    rejects = [json.loads(l) for l in (tmp_path / "f" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6]
    assert all(r["reject_reason"].startswith("bad_record: ") for r in rejects)
    assert "missing field 'completion'" in rejects[1]["reject_reason"]
    assert "wrong type" in rejects[2]["reject_reason"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_generate_filter_export_chain(tmp_path, fmt):
    import datasets

    gen, filt = tmp_path / "gen", tmp_path / "filt"
    assert cli(["distill", "generate", "--prompts", "synthetic", "--limit", "30", "--n", "4", "--out", str(gen)]) == 0
    assert cli(["distill", "filter", "--input", str(gen), "--out", str(filt), "--set", "keep_per_prompt=2"]) == 0
    summary = json.loads((filt / "summary.json").read_text())
    assert summary["kept"] + summary["rejected"] == 120 and summary["kept"] > 30
    assert "wrong_answer" in summary["reasons"] and "rejection_sampling_surplus" in summary["reasons"]
    out = tmp_path / f"sft.{fmt}"
    assert cli(["distill", "export", "--input", str(filt), "--out", str(out), "--format", fmt, "--kinds", "both"]) == 0
    if fmt == "jsonl":
        rows = [json.loads(l) for l in out.read_text().splitlines()]
    elif fmt == "parquet":
        rows = datasets.load_dataset("parquet", data_files=str(out), split="train").to_list()
    else:
        rows = datasets.load_from_disk(str(out)).to_list()
    r1 = [r for r in rows if r["kind"] == "r1"]
    original = [r for r in rows if r["kind"] == "original"]
    assert len(r1) == summary["kept"] and len(original) == summary["prompts_kept"]
    first = r1[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert json.loads(first["teacher"])["engine"] == "scripted-teacher"
    assert json.loads(first["verification"])["score"] == 1.0
    assert json.loads(first["sampling"])["n"] == 4
    assert [m["role"] for m in original[0]["messages"]] == ["user", "assistant"]
