"""Where the time of one training step of the V3-shaped model goes (bench_fp8_model.py's step).

    python benchmarks/profile_step.py [--variants bf16,fp8] [--rows 20] [--by-op 40] [--python 30]

Per variant: host syncs in one forward + backward (each drains the GPU queue), the wall time
of a step (do_bench median) against the GPU kernel time of one (torch.profiler): the
difference is the GPU waiting for the CPU. Then the top GPU kernels. With --python N, also the
CPU's side: how long issuing one step takes (the call returns before the GPU is done unless
something syncs), and the N Python functions with the most own time under cProfile.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import build_ours, hf_config, our_args, synthetic_batches  # noqa: E402
from profile_moe import host_syncs, kernel_time_us, kernels_by_op  # noqa: E402


def host_cost(step, rows: int) -> str:
    """The CPU's time to issue one step (median of 5, the GPU idle at the start, so the call
    returns as soon as everything is queued) and a cProfile table of one step by own time."""
    import cProfile
    import io
    import pstats
    import time
    issue = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return f"    CPU issue time of one step: {sorted(issue)[2]:.1f} ms (median of 5)\n" + out.getvalue()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--by-op", type=int, default=0, help="also list the N ops with the most GPU time, with shapes")
    p.add_argument("--python", type=int, default=0, help="also the CPU issue time and the N costliest Python functions")
    a = p.parse_args()
    args = our_args(hf_config(False))
    ids = synthetic_batches(args.vocab_size, 4, 2048, 1)[0]
    labels = ids.roll(-1, 1)
    for variant in a.variants.split(","):
        m = build_ours(args, variant == "fp8")

        def step():
            m.zero_grad(set_to_none=True)  # as an optimizer step leaves them
            m.compute(ids, labels=labels, with_mtp=False).loss.backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        syncs = host_syncs(step)
        from triton.testing import do_bench
        wall = do_bench(step, warmup=300, rep=2000, return_mode="median")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=a.by_op > 0) as prof:
            step()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        kernel_ms = kernel_time_us(prof) / 1e3
        print(f"\n### {variant}: {len(syncs)} host syncs; step wall {wall:.1f} ms, GPU kernels {kernel_ms:.1f} ms")
        for line in syncs[:8]:
            print("   ", line)
        print(avg.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))
        if a.by_op:
            print(kernels_by_op(prof, a.by_op))
        if a.python:
            print(host_cost(step, a.python))
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
