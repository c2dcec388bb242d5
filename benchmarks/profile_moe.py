"""Where the time of one MoE layer's forward + backward goes: a torch.profiler table per variant.

    python benchmarks/profile_moe.py [--variants bf16,fp8] [--tokens 16384] [--rows 25] [--by-op 30] [--gaps 20]
                                     [--sort self_cpu_time_total]

The layer is the benchmark shape of bench_fp8_model.py (64 experts top-6, 2 shared, hidden
2048, width 1408), bf16, random weights and inputs. Prints, per variant, the host syncs of one
forward + backward (torch.cuda sync debug mode: each one drains the GPU queue, so the CPU
cannot run ahead), the GPU kernel time against the wall time of a pass (the difference is the
GPU waiting for the CPU), and the top GPU kernels by total time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import hf_config, our_args  # noqa: E402

from posttrain.model.fp8_training import enable_fp8_training  # noqa: E402
from posttrain.model.moe import MoE  # noqa: E402


def host_syncs(fn) -> list[str]:
    """Run fn once under torch.cuda's sync debug mode; the first line of each sync warning."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:120] for w in caught
            if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]


def kernel_time_us(prof) -> float:
    """Total GPU kernel time (microseconds) a torch.profiler run recorded."""
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")


def kernels_by_op(prof, rows: int) -> str:
    """The ops that launched the most GPU time, each with its input shapes (the profile must be
    recorded with record_shapes=True): which call of an op (a cast of which tensor, an add of
    which gradients) a kernel belongs to, which the kernel table cannot say."""
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type.name == "CPU" and e.self_device_time_total > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"  {'op':34s} {'calls':>5s} {'GPU ms':>8s}  input shapes"]
    for e in ops[:rows]:
        lines.append(f"  {e.key[:34]:34s} {e.count:5d} {e.self_device_time_total / 1e3:8.3f}  {str(e.input_shapes)[:110]}")
    return "\n".join(lines)


def gpu_gaps(prof, rows: int) -> str:
    """Where the GPU sat idle between kernels in the profiled passes: the total, the largest gaps
    with the kernels on either side, and the CUDA runtime calls that can stall the CPU
    (allocations, frees and synchronisations)."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    gaps = []
    t0 = kernels[0].time_range.start if kernels else 0.0
    for prev, nxt in zip(kernels, kernels[1:]):
        idle = nxt.time_range.start - prev.time_range.end
        if idle > 0:
            gaps.append((idle, f"{prev.name} (at {(prev.time_range.end - t0) / 1e3:.2f} ms)", nxt.name))
    total = sum(g for g, _, _ in gaps)
    lines = [f"  GPU idle between kernels: {total / 1e3:.3f} ms over {len(kernels)} kernels "
             f"({sum(g > 20 for g, _, _ in gaps)} gaps over 20 us)"]
    for idle, a, b in sorted(gaps, reverse=True)[:rows]:
        lines.append(f"  {idle:8.1f} us  after {a[:70]:70s} before {b[:50]}")
    runtime = {}
    for e in prof.events():
        if e.device_type.name == "CPU" and any(k in e.name for k in ("Malloc", "Free", "Synchronize")):
            n, t = runtime.get(e.name, (0, 0.0))
            runtime[e.name] = (n + 1, t + e.cpu_time_total)
    for name, (n, t) in sorted(runtime.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  runtime {name:40s} {n:5d} calls {t / 1e3:8.3f} ms CPU")
    return "\n".join(lines)


def benchmark_layer(variant: str, tokens: int):
    """(layer, input, output gradient): the benchmark MoE layer in bf16 with random weights
    (FP8 GEMMs when variant == "fp8") and random [1, tokens, hidden] tensors, on the GPU."""
    args = our_args(hf_config(False))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, tokens, args.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn_like(x)
    moe = MoE(args).cuda()
    with torch.no_grad():
        for prm in moe.parameters():
            prm.copy_(torch.randn(prm.shape, device="cuda", generator=g) * 0.02)
    moe = moe.to(torch.bfloat16).train()
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    if variant == "fp8":
        enable_fp8_training(moe)
    return moe, x, dy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--by-op", type=int, default=0, help="also list the N ops with the most GPU time, with shapes")
    p.add_argument("--gaps", type=int, default=0, help="also list the N longest GPU idle gaps between kernels")
    p.add_argument("--sort", default="cuda_time_total",
                   help="the table's order: cuda_time_total, or self_cpu_time_total for what the CPU spends issuing")
    a = p.parse_args()
    for variant in a.variants.split(","):
        moe, x, dy = benchmark_layer(variant, a.tokens)

        def step():
            moe.zero_grad(set_to_none=True)  # as an optimizer step leaves them
            xi = x.detach().requires_grad_(True)
            moe(xi).backward(dy)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        syncs = host_syncs(step)
        print(f"\n### {variant}: {len(syncs)} host syncs in one forward+backward")
        for line in syncs[:10]:
            print("   ", line)
        from triton.testing import do_bench
        wall = do_bench(step, warmup=100, rep=500, return_mode="median")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=a.by_op > 0) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        kernel_us = kernel_time_us(prof)
        print(f"\n### {variant}: 3 forward+backward passes, {a.tokens} tokens; per pass: wall {wall:.2f} ms "
              f"(do_bench median), GPU kernels {kernel_us / 3e3:.2f} ms")
        print(prof.key_averages().table(sort_by=a.sort, row_limit=a.rows, max_name_column_width=60))
        if a.by_op:
            print(kernels_by_op(prof, a.by_op))
        if a.gaps:
            print(gpu_gaps(prof, a.gaps))


if __name__ == "__main__":
    main()
