"""The training loop's two layouts on one GPU: DDP (accelerate, bf16 autocast) against FSDP2
(train.fsdp, bf16 compute policy), the path expert-parallel runs take.

    python benchmarks/check_trainer_layouts.py [--steps 12] [--layers 2] [--quick]

Both start from the same weights and see the same batches (random tokens, B x T per step).
Checked: every step's loss agrees within bf16 tolerance (the two layouts round differently:
autocast keeps some ops in fp32, FSDP's policy casts the weights), the gradient norms agree,
and the exported HF checkpoints of the two runs load with close logits. Reported: tokens/s
of each layout after 2 warm-up steps and peak memory. The FSDP run also checkpoints its
sharded training state and resumes from it: its later steps must repeat the uninterrupted
run's losses (bitwise on CPU; on a GPU within the noise of non-deterministic kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_expert_parallel import v3_args  # noqa: E402
from tables import print_tables  # noqa: E402

from posttrain.model import Transformer, load_checkpoint  # noqa: E402
from posttrain.train.config import TrainConfig  # noqa: E402
from posttrain.train.loop import Trainer, lm_loss  # noqa: E402


def rows_for(n: int, T: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (T,), generator=g)} for _ in range(n)]


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def run(layout: str, args, init: dict, rows, cfg_kw: dict, out: Path) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each layout asks accelerate for its own precision
    model = Transformer(args)
    model.load_state_dict(init)
    cfg = TrainConfig(out_dir=str(out), report_to=["jsonl"], progress=False, fsdp=layout == "fsdp", **cfg_kw)
    trainer = Trainer(model, cfg, lm_loss(0.0), collate)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.fit(rows)
    wall = time.perf_counter() - t0
    trainer.export(out / "final", args)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    if layout == "ddp":  # its training state is not needed; fp32 weights + Adam take disk
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"metrics": metrics, "wall": wall, "result": result, "trainer": trainer,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    a = ap.parse_args()
    args = v3_args(a.quick, a.layers)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Transformer(args).state_dict().items()}
    rows = rows_for(a.batch * a.steps, a.seq if not a.quick else 64, args.vocab_size, seed=1)
    kw = dict(max_steps=a.steps, batch_size=a.batch, lr=3e-4, min_lr=3e-4, weight_decay=0.0,
              mixed_precision="bf16" if torch.cuda.is_available() else "no", save_every=a.steps // 2)
    tmp = Path(tempfile.mkdtemp())
    try:
        ddp = run("ddp", args, init, rows, kw, tmp / "ddp")
        del ddp["trainer"]
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        fsdp = run("fsdp", args, init, rows, kw, tmp / "fsdp")
        trainer = fsdp.pop("trainer")
        # resume the sharded run from its mid-run training state: the same final weights
        final = load_checkpoint(tmp / "fsdp" / "final", dtype=torch.float32)[0].state_dict()
        ckpts = tmp / "fsdp" / "checkpoints"
        mid = f"step-{a.steps // 2:08d}"
        for p in ckpts.glob("step-*"):
            if p.name != mid:
                shutil.rmtree(p)
        (ckpts / "latest").write_text(mid)
        shutil.rmtree(tmp / "fsdp" / "final")
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        model = Transformer(args)
        model.load_state_dict(init)
        cfg = TrainConfig(out_dir=str(tmp / "fsdp"), report_to=["jsonl"], progress=False, fsdp=True, **kw)
        resumed = Trainer(model, cfg, lm_loss(0.0), collate)
        resumed.fit(rows)
        resumed.export(tmp / "fsdp" / "final", args)
        again = load_checkpoint(tmp / "fsdp" / "final", dtype=torch.float32)[0].state_dict()
        # bitwise on CPU (tests); on a GPU, atomics in backward make two identical runs differ
        # slightly, so the resumed steps are compared by loss and the weights by relative norm
        resume_w = max(float((again[k].double() - final[k].double()).norm() / final[k].double().norm().clamp(min=1e-30))
                       for k in final)
        after = [json.loads(l) for l in (tmp / "fsdp" / "metrics.jsonl").read_text().splitlines()]
        resume_loss = max(abs(x["loss"] - y["loss"]) / abs(y["loss"])
                          for x, y in zip(after[a.steps // 2:], fsdp["metrics"][a.steps // 2:]))
        del trainer, resumed

        table = []
        worst_loss = worst_norm = 0.0
        for m_d, m_f in zip(ddp["metrics"], fsdp["metrics"]):
            worst_loss = max(worst_loss, abs(m_f["loss"] - m_d["loss"]) / abs(m_d["loss"]))
            worst_norm = max(worst_norm, abs(m_f["grad_norm"] - m_d["grad_norm"]) / abs(m_d["grad_norm"]))
        toks = a.batch * (a.seq if not a.quick else 64)
        for name, r in (("ddp (accelerate, autocast bf16)", ddp), ("fsdp2 (bf16 policy)", fsdp)):
            steady = [m["tokens_per_s"] for m in r["metrics"][2:]] or [0.0]
            table.append({"section": "layouts, one device", "layout": name, "first loss": f"{r['metrics'][0]['loss']:.4f}",
                          "last loss": f"{r['metrics'][-1]['loss']:.4f}",
                          "tokens/s (median after 2)": f"{sorted(steady)[len(steady) // 2]:.0f}",
                          "peak GiB": f"{r['peak_gb']:.1f}"})
        print_tables(table, ("layouts, one device",))
        ok = worst_loss < 2e-2 and worst_norm < 5e-2 and resume_loss < 1e-3 and resume_w < 1e-2
        print(json.dumps({"tokens_per_step": toks, "max_rel_loss_diff": worst_loss,
                          "max_rel_grad_norm_diff": worst_norm, "resumed_steps_max_rel_loss_diff": resume_loss,
                          "resumed_weights_max_rel_diff": resume_w, "ok": ok}))
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
