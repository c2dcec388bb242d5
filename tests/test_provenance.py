"""Provenance travels: the system prompt the teacher was sampled with stays with the data
through filter and export (unless told otherwise, and the summary says which), a checkpoint
trained on it remembers it, and GRPO from that checkpoint samples with it by default."""

import json

import pytest

from posttrain.cli import main as cli

SYSTEM = "Think step by step and check your work."


@pytest.fixture(scope="module")
def chain(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("provenance")
    (root / "system.txt").write_text(SYSTEM)
    assert cli(["distill", "generate", "--prompts", "synthetic", "--limit", "24", "--n", "2", "--max-tokens", "512",
                "--system-prompt", f"@{root / 'system.txt'}", "--out", str(root / "gen")]) == 0
    assert cli(["distill", "filter", "--input", str(root / "gen"), "--out", str(root / "filt")]) == 0
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("TQDM_DISABLE", "1")
    yield mp
    mp.undo()


def test_generate_records_and_the_manifest_carry_the_system_prompt(chain):
    record = json.loads((chain / "gen" / "shards" / "gen-00000.jsonl").read_text().splitlines()[0])
    assert record["system_prompt"] == SYSTEM and record["messages"][0] == {"role": "system", "content": SYSTEM}
    manifest = json.loads((chain / "gen" / "manifest.json").read_text())
    assert manifest["system_prompt"] == SYSTEM and manifest["chat_template"]
    assert json.loads((chain / "filt" / "generation.json").read_text()) == manifest


def test_export_keeps_it_unless_told_and_says_which(chain, capsys):
    assert cli(["distill", "export", "--input", str(chain / "filt"), "--out", str(chain / "keep.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(l) for l in (chain / "keep.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][0] == {"role": "system", "content": SYSTEM} for r in rows)
    assert summary["system_prompt_policy"] == "kept from generation"
    assert summary["system_prompts"] == [{"system_prompt": SYSTEM, "rows": len(rows)}]
    assert (chain / "keep.jsonl.generation.json").exists()
    assert cli(["distill", "export", "--input", str(chain / "filt"), "--out", str(chain / "none.jsonl"),
                "--no-system-prompt"]) == 0
    assert json.loads(capsys.readouterr().out)["system_prompt_policy"] == "none"
    assert all(r["messages"][0]["role"] == "user" for r in map(json.loads, (chain / "none.jsonl").read_text().splitlines()))


def test_sft_remembers_it_and_grpo_samples_with_it(chain, tmp_path):
    from posttrain.config import load_config
    from posttrain.paths import model_config, shipped_config
    from posttrain.stages.grpo import GRPOConfig, check_grpo, system_prompt_for
    from posttrain.stages.sft import SFTConfig, run_sft

    assert cli(["distill", "export", "--input", str(chain / "filt"), "--out", str(tmp_path / "sft.jsonl")]) == 0
    cfg = load_config(SFTConfig, shipped_config("sft", "tiny.yaml"), [
        f"data.sources.0.path={tmp_path / 'sft.jsonl'}", f"output_dir={tmp_path / 'sft'}",
        f"data.cache_dir={tmp_path / 'cache'}", f"model.config={model_config('tiny')}", "train.max_steps=1",
        "train.progress=false", "data.max_length=1024"])
    run_sft(cfg)
    provenance = json.loads((tmp_path / "sft" / "final" / "posttrain-training.json").read_text())
    assert provenance["system_prompt"] == SYSTEM
    grpo = check_grpo(load_config(GRPOConfig, None, [f"model.path={tmp_path / 'sft' / 'final'}"]))
    assert system_prompt_for(grpo) == SYSTEM                       # "auto": the one it was trained with
    grpo.prompts.system_prompt = None
    assert system_prompt_for(grpo) is None                         # null: none
