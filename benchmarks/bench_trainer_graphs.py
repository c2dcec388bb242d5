"""The training loop with and without `train.cuda_graphs`, on the V3-shaped benchmark model.

    python benchmarks/bench_trainer_graphs.py [--variants bf16,fp8] [--steps 16] [--quick] [--no-floor]

Per variant, two fresh copies of the model (same init) train the same packed batches (4 rows
x 2048 tokens, four samples per row, positions restarting, attention kept within a sample)
through `Trainer.optimizer_step`, the loop's own step (AdamW, clipping, bias update): once
eagerly (twice, unless --no-floor: two eager runs differ too, through the atomics of
attention's backward, and that is the floor of the comparison), once with the micro-batch
captured as a CUDA graph. Prints the losses step by step, the largest relative loss and
parameter differences, and the median wall time per optimizer step after the graph run's
warm-up and capture. No checkpoint is written.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import build_ours, hf_config, our_args, synthetic_batches  # noqa: E402

from posttrain.train.config import TrainConfig  # noqa: E402
from posttrain.train.loop import Trainer, lm_loss  # noqa: E402
from posttrain.train.optim import build_scheduler  # noqa: E402


def packed_batches(vocab: int, B: int, T: int, n: int, samples_per_row: int = 4) -> list[dict]:
    """n batches of B packed rows: `samples_per_row` samples of T / samples_per_row tokens each,
    labels the next token within a sample, as the SFT collate makes them (on the CPU)."""
    out = []
    per = T // samples_per_row
    seg = torch.arange(samples_per_row).repeat_interleave(per)[None].expand(B, T).contiguous()
    pos = torch.arange(per).repeat(samples_per_row)[None].expand(B, T).contiguous()
    for ids in synthetic_batches(vocab, B, T, n, device="cpu"):
        labels = ids.roll(-1, 1)
        labels[:, per - 1::per] = -100  # the last token of a sample predicts nothing
        out.append({"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos})
    return out


def run(args, fp8: bool, graphs: bool, batches: list[dict], out_dir: str):
    model = build_ours(args, False)
    cfg = TrainConfig(out_dir=out_dir, batch_size=batches[0]["input_ids"].shape[0], lr=3e-4, warmup_steps=0,
                      max_steps=len(batches), fp8=fp8, cuda_graphs=graphs, report_to=[], progress=False)
    trainer = Trainer(model, cfg, lm_loss(0.3), collate=lambda rows: rows)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg, len(batches))
    losses, times = [], []
    for b in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sums, _, finite, _, _ = trainer.optimizer_step(iter([b]), 1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(sums["loss"])
    # kept on the CPU in the parameters' dtype: three runs' copies would not fit beside a model
    params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    replays = trainer.graphs.replays if trainer.graphs is not None else 0
    failed = trainer.graphs.failed if trainer.graphs is not None else None
    del trainer, model
    gc.collect()  # the graph holds its memory pool until the trainer that owns it is collected
    torch.cuda.empty_cache()
    return losses, times, params, replays, failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the second eager run")
    a = p.parse_args()
    args = our_args(hf_config(a.quick))
    B, T = (2, 512) if a.quick else (4, 2048)
    batches = packed_batches(args.vocab_size, B, T, a.steps)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {a.steps} steps of {B} x {T} packed tokens")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in a.variants.split(","):
            fp8 = variant == "fp8"
            eager = run(args, fp8, False, batches, tmp)
            # two eager runs: the floor of the comparison (attention's backward sums with atomics)
            again = run(args, fp8, False, batches, tmp) if a.floor else None
            graph = run(args, fp8, True, batches, tmp)
            warm = 4  # the graph run's warm-up and capture

            def gaps(x, y):
                rel = max(float((y[2][n].float() - w.float()).norm() / w.float().norm().clamp(min=1e-30))
                          for n, w in x[2].items())
                return max(abs(u - v) / abs(u) for u, v in zip(x[0], y[0])), rel
            e_ms, g_ms = statistics.median(eager[1][warm:]), statistics.median(graph[1][warm:])
            print(f"\n### {variant}: eager {e_ms:.1f} ms per optimizer step, "
                  f"CUDA graph {g_ms:.1f} ms ({e_ms / g_ms:.2f}x); {graph[3]} replays; capture failure: {graph[4]}")
            print("    loss eager / graph per step: " + " ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(eager[0], graph[0])))
            for name, other in (("eager vs eager again", again), ("eager vs graph", graph)):
                if other is None:
                    continue
                loss_gap, rel = gaps(eager, other)
                print(f"    {name}: largest relative loss gap {loss_gap:.1e}, largest relative parameter gap "
                      f"at the end {rel:.1e}")


if __name__ == "__main__":
    main()
