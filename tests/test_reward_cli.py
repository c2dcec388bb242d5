"""`posttrain reward score` on a jsonl with good and bad lines."""

import json

from posttrain.cli import main as cli


def test_reward_score_writes_scores_summary_and_rejects(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": "1+1?", "response": "<think>easy</think>\\boxed{2}", "gold": "2"}),
        json.dumps({"prompt": "2+2?", "response": "\\boxed{5}", "gold": "4"}),
        "{not json",
        json.dumps({"prompt": "no completion"}),
        json.dumps({"response": 7, "gold": "7"}),
        json.dumps({"response": "\\boxed{3}"}),  # no gold: not applicable
    ]
    data.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf8\n")
    out = tmp_path / "out.jsonl"
    rc = cli(["reward", "score", "--reward", "math", "--data", str(data), "--out", str(out),
              "--map", "completion=response", "--map", "answer=gold", "--option", "deadline_s=3"])
    assert rc == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 0.0, None]
    assert scored[1]["reward_reason"] == "mismatch"
    rejects = [json.loads(l) for l in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [3, 4, 5, 7]
    assert "invalid JSON" in rejects[0]["reason"] and "missing field 'completion'" in rejects[1]["reason"]
    assert "must be a string" in rejects[2]["reason"] and rejects[3]["reason"] == "not UTF-8"
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["scored"] == 2 and summary["not_applicable"] == 1 and summary["rejected_lines"] == 4
    assert summary["mean"] == 0.5
    assert "1 full / 1 zero" in capsys.readouterr().out


def test_unknown_reward_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"completion": "x"}) + "\n")
    assert cli(["reward", "score", "--reward", "nope", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
