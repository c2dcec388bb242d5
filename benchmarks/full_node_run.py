"""A full-node run of the product stages: SFT in bf16 and FP8, then GRPO, under EP + FSDP2.

    python benchmarks/full_node_run.py --nproc 8 --ep 8                       # 8 GPUs, the 16B config
    python benchmarks/full_node_run.py --nproc 1 --ep 1 --layers 4 --steps 30   # one GPU, 4 layers of it
    python benchmarks/full_node_run.py --cpu --nproc 2 --ep 2 --model configs/model/tiny.json \\
        --seq 256 --steps 4 --grpo-iterations 1                               # CPU smoke (gloo)

What runs, each stage under `torchrun --nproc_per_node N -m posttrain ...` exactly as a user
launches it (README, "Multi-GPU and multi-node"):
1. SFT from random weights (`model.config`, built in bf16) on GSM8K train (../shared/data)
   packed into --seq-token rows, `train.expert_parallel=EP train.fsdp=true
   train.mixed_precision=bf16`, once in bf16 and once with `train.fp8=true`, on the same rows
   in the same order for --steps steps. Reported per run: tokens/s per GPU (median over the
   logged steps after the first few), MFU against --peak-tflops, peak memory per GPU; then
   the two loss curves side by side and their relative gap.
2. GRPO from the bf16 SFT checkpoint with the torch engine (sampling from a whole copy of the
   policy that every rank refreshes from the gathered weights) on the synthetic arithmetic
   prompts: per iteration, seconds in rollout, weight sync and training.
The driver writes everything under --out and prints markdown tables last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import print_tables  # noqa: E402

from posttrain.model import ModelArgs  # noqa: E402
from posttrain.model.counting import count_parameters, training_flops_per_token  # noqa: E402

ROWS: list[dict] = []


def row(section: str, **kv) -> None:
    kv["section"] = section
    ROWS.append(kv)
    print(json.dumps(kv), flush=True)


def model_config(path: str, layers: int | None, out: Path) -> Path:
    cfg = json.loads(Path(path).read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    dest = out / "model_config.json"
    dest.write_text(json.dumps(cfg, indent=1))
    return dest


def sft_data(src: Path, out: Path) -> Path:
    """GSM8K train as chat rows (question -> worked answer)."""
    dest = out / "gsm8k_sft.jsonl"
    with open(src) as f, open(dest, "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                             {"role": "assistant", "content": r["answer"]}]}) + "\n")
    return dest


def launch(stage: str, config: Path, a, log: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
           "--master_port", str(a.port), "-m", "posttrain", stage, "--config", str(config)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if a.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"{stage} failed (exit {rc}); log: {log}")
    return time.perf_counter() - t0


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_sft(a, cfg_path: Path, data: Path, fp8: bool) -> Path:
    name = "sft-fp8" if fp8 else "sft-bf16"
    out = a.out / name
    cfg = {
        "model": {"config": str(cfg_path), "tokenizer": "embedded", "dtype": "bfloat16"},
        "data": {"sources": [{"path": str(data)}], "max_length": a.seq, "pack": True, "overlong": "drop",
                 "cache_dir": str(a.out / "data_cache")},
        "train": {"max_steps": a.steps, "batch_size": a.batch, "grad_accum": 1, "lr": a.lr, "min_lr": a.lr / 10,
                  "warmup_steps": min(10, a.steps // 5), "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
                  "expert_parallel": a.ep, "fsdp": True, "mixed_precision": "bf16", "fp8": fp8,
                  "activation_checkpointing": a.checkpointing, "mtp_weight": 0.0, "bias_update_gamma": 0.001,
                  "log_every": 1, "save_every": 0, "report_to": ["jsonl"], "progress": False},
        "output_dir": str(out),
    }
    path = a.out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wall = launch("sft", path, a, a.out / f"{name}.log")
    args = ModelArgs.from_json(cfg_path)
    rows = metrics(out)
    steady = [r for r in rows if r.get("step", 0) > min(5, a.steps // 2)] or rows
    tps = statistics.median(r["tokens_per_s"] for r in steady)  # this process's tokens: per GPU
    peak = max((r.get("peak_memory_gib", 0.0) for r in rows), default=0.0)
    row("sft", run=name, steps=len(rows), tokens_s_per_gpu=round(tps), tokens_s_total=round(tps * a.nproc),
        mfu=f"{100 * tps * training_flops_per_token(args, a.seq) / (a.peak_tflops * 1e12):.1f}%",
        peak_gib_rank0=round(peak, 1), first_loss=round(rows[0]["loss"], 4), last_loss=round(rows[-1]["loss"], 4),
        wall_s=round(wall))
    return out


def compare_losses(bf16_run: Path, fp8_run: Path, every: int) -> None:
    b, f = metrics(bf16_run), metrics(fp8_run)
    for rb, rf in zip(b, f):
        if rb["step"] % every == 0 or rb is b[-1]:
            row("loss", step=rb["step"], bf16=round(rb["loss"], 4), fp8=round(rf["loss"], 4),
                rel_gap=f"{(rf['loss'] - rb['loss']) / rb['loss']:+.2%}")
    tail = max(1, min(20, len(b) // 5))
    mb = statistics.mean(r["loss"] for r in b[-tail:])
    mf = statistics.mean(r["loss"] for r in f[-tail:])
    row("loss", step=f"mean of last {tail}", bf16=round(mb, 4), fp8=round(mf, 4), rel_gap=f"{(mf - mb) / mb:+.2%}")


def run_grpo(a, sft_final: Path) -> None:
    out = a.out / "grpo"
    cfg = yaml.safe_load((ROOT / "configs" / "grpo" / "tiny.yaml").read_text())
    cfg["model"] = {"path": str(sft_final), "dtype": "bfloat16"}
    cfg["prompts"].update(limit=max(a.grpo_prompts * (a.grpo_iterations + 1), 64), eval_limit=a.nproc * 2)
    cfg["grpo"].update(prompts_per_step=a.grpo_prompts, group_size=a.grpo_group, max_new_tokens=a.grpo_tokens,
                       micro_batch_size=a.grpo_micro_batch,
                       dynamic_sampling=False)  # train on every group: a random policy earns no reward
    cfg["iterations"] = a.grpo_iterations
    cfg["engine"] = "torch"
    cfg["train"].update(expert_parallel=a.ep, fsdp=True, mixed_precision="bf16", save_every=0, progress=False,
                        activation_checkpointing=a.checkpointing)
    cfg["output_dir"] = str(out)
    path = a.out / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wall = launch("grpo", path, a, a.out / "grpo.log")
    for r in metrics(out):
        total = r["rollout_s"] + r["weight_sync_s"] + r["train_s"]
        row("grpo", iteration=r.get("iteration", r["step"]), rollout_s=round(r["rollout_s"], 2),
            weight_sync_s=round(r["weight_sync_s"], 2), train_s=round(r["train_s"], 2),
            rollout_share=f"{r['rollout_s'] / total:.0%}", sync_share=f"{r['weight_sync_s'] / total:.0%}",
            train_share=f"{r['train_s'] / total:.0%}", reward_mean=round(r.get("reward_mean", 0.0), 3))
    row("grpo", iteration="whole stage", note=f"wall {wall:.0f} s, with model build, evaluations and export")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--model", default=str(ROOT / "configs" / "model" / "16B.json"))
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers of --model")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="packed rows per GPU per step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)")
    p.add_argument("--grpo-iterations", type=int, default=3)
    p.add_argument("--grpo-prompts", type=int, default=16)
    p.add_argument("--grpo-group", type=int, default=8)
    p.add_argument("--grpo-tokens", type=int, default=128)
    p.add_argument("--grpo-micro-batch", type=int, default=8,
                   help="sequences per forward in GRPO training (full-vocab logits: keep it small)")
    p.add_argument("--sections", default="sft,grpo")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl",
                   help="GSM8K train jsonl (question, answer)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU: a smoke run of this script")
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--out", type=Path, default=Path("runs/full_node"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg_path = model_config(a.model, a.layers, a.out)
    args = ModelArgs.from_json(cfg_path)
    c = count_parameters(args)
    print(f"model {a.model} ({args.num_hidden_layers} layers): {c.total / 1e9:.2f}B parameters, "
          f"{c.active / 1e9:.2f}B activated; {a.nproc} processes, EP={a.ep}", flush=True)
    sections = a.sections.split(",")
    try:
        bf16_run = None
        if "sft" in sections:
            data = sft_data(a.data, a.out)
            bf16_run = run_sft(a, cfg_path, data, fp8=False)
            fp8_run = run_sft(a, cfg_path, data, fp8=True)
            compare_losses(bf16_run, fp8_run, every=max(1, a.steps // 10))
        if "grpo" in sections:
            if bf16_run is None and not (a.out / "sft-bf16" / "final").exists():
                bf16_run = run_sft(a, cfg_path, sft_data(a.data, a.out), fp8=False)  # GRPO starts from it
            run_grpo(a, (bf16_run or a.out / "sft-bf16") / "final")
    finally:
        print_tables(ROWS, ("sft", "loss", "grpo"))


if __name__ == "__main__":
    main()
