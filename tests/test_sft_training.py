"""The shared training loop through `posttrain sft`: exact resume after kill -9, LoRA, NaN steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import randomize_, small_args
from posttrain.model import Transformer, load_checkpoint, save_checkpoint
from posttrain.train.config import TrainConfig
from posttrain.train.loop import Trainer, lm_loss
from posttrain.train.optim import cosine_with_floor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    args = small_args(vocab_size=640, max_position_embeddings=256)
    from posttrain.embedded import build_tokenizer, make_problems

    tok = build_tokenizer(640)
    model = randomize_(Transformer(args), seed=3, std=0.05)
    save_checkpoint(model, args, d / "base", dtype=torch.float32, tokenizer=tok)
    rows = [{"messages": [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": " ".join(p.steps) + f" \\boxed{{{p.answer}}}"}]}
            for p in make_problems(48, seed=1)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _sft(setup, out, *extra, background=False):
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--config", str(ROOT / "configs/sft/tiny.yaml"),
           f"model.path={setup / 'base'}", "model.config=null", "model.tokenizer=null",
           f"data.sources.0.path={setup / 'data.jsonl'}", "data.max_length=128", f"data.cache_dir={setup / 'cache'}",
           "train.max_steps=8", "train.batch_size=2", "train.save_every=2", "train.warmup_steps=2",
           "train.progress=false", f"output_dir={out}", *extra]
    # one CPU thread: multi-threaded CPU kernels already differ by ~1e-7 between two
    # uninterrupted runs; with one thread the comparison below is bitwise
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def test_kill_9_and_resume_gives_the_weights_of_an_uninterrupted_run(setup, tmp_path):
    _sft(setup, tmp_path / "ref")
    proc = _sft(setup, tmp_path / "run", background=True)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (tmp_path / "run" / "final").exists()
    resumed_from = latest.read_text()
    _sft(setup, tmp_path / "run")
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, resumed_from)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no step logged twice, none missing
    base, _ = load_checkpoint(setup / "base", dtype=torch.float32)
    assert not torch.equal(base.embed_tokens.weight, a["model.embed_tokens.weight"])  # it trained


def test_lora_changes_only_adapters_and_the_merged_checkpoint_loads_in_transformers(setup, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    out = tmp_path / "lora"
    _sft(setup, out, "lora.enabled=true", "lora.r=4", "train.lr=0.01")
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("experts" in k for k in adapter) and any("kv_b_proj" in k for k in adapter)
    assert all("lora_" in k for k in adapter)  # only adapter weights are saved
    merged, _ = load_checkpoint(out / "final", dtype=torch.float32)
    base, _ = load_checkpoint(setup / "base", dtype=torch.float32)
    # the base's non-adapted weights are untouched; adapted ones moved by the merged delta
    assert torch.equal(merged.embed_tokens.weight, base.embed_tokens.weight)
    assert torch.equal(merged.norm.weight, base.norm.weight)
    assert not torch.equal(merged.layers[0].self_attn.o_proj.weight, base.layers[0].self_attn.o_proj.weight)
    assert not torch.equal(merged.layers[1].mlp.experts.gate_up_proj, base.layers[1].mlp.experts.gate_up_proj)
    hf = DeepseekV3ForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 640, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - merged.eval()(ids)).abs().max() < 1e-4


def test_nonfinite_loss_skips_the_step_and_is_logged(tmp_path):
    args = small_args()
    model = randomize_(Transformer(args), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    inner = lm_loss(0.3)

    def loss_fn(m, batch):
        calls["n"] += 1
        loss, metrics = inner(m, batch)
        return (loss * float("nan"), metrics) if calls["n"] == 2 else (loss, metrics)

    rows = [{"input_ids": torch.randint(0, args.vocab_size, (12,)).tolist(), "loss_mask": [1] * 12} for _ in range(6)]
    from data_recipes.sft_data import collate

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=2, lr=1e-2, progress=False, report_to=["jsonl"])
    result = Trainer(model, cfg, loss_fn, lambda r: collate(r, 0)).fit(rows)
    assert result["skipped_nonfinite"] == 1 and result["steps"] == 3
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_step", False) for r in log] == [False, True, False]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_warmup_then_cosine_to_the_floor():
    lrs = [cosine_with_floor(s, 100, 10, 5e-6, 1e-6) for s in range(101)]
    assert lrs[0] == pytest.approx(5e-7) and lrs[9] == pytest.approx(5e-6)
    assert lrs[55] == pytest.approx(3e-6) and lrs[100] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
