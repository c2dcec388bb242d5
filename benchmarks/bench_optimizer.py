"""The optimizer's share of a training step on the V3-shaped benchmark model (4.31B parameters, bf16).

    python benchmarks/bench_optimizer.py [--quick]

Every parameter gets a random gradient; then, each the median of 5 calls: gradient clipping
(torch.nn.utils.clip_grad_norm_, as accelerate runs it), torch's AdamW as `build_optimizer`
made it before (foreach) and fused (one kernel per group of tensors), and the bf16-moment
AdamW of `train.optim`. The moments exist before timing starts (one untimed step each), and
the updated parameters of foreach and fused AdamW are compared from the same start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import build_ours, hf_config, our_args  # noqa: E402

from posttrain.train.optim import AdamWBf16Moments, param_groups  # noqa: E402


def timed(fn, n=5) -> float:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    model = build_ours(our_args(hf_config(a.quick)), False)
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.Generator(device="cuda").manual_seed(0)
    for q in params:
        q.grad = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g) * 1e-3
    n = sum(q.numel() for q in params)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {n / 1e9:.2f}B parameters, bf16")
    print(f"  clip_grad_norm_           {timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)):7.1f} ms")
    start = [q.detach().clone() for q in params]
    results = {}
    for name, make in (("AdamW foreach", lambda: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, foreach=True)),
                       ("AdamW fused", lambda: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)),
                       ("AdamW bf16 moments", lambda: AdamWBf16Moments(param_groups(model, 0.1), lr=1e-4))):
        with torch.no_grad():
            for q, s in zip(params, start):
                q.copy_(s)
        opt = make()
        opt.step()  # moments made
        results[name] = [q.detach().clone() for q in params[:8]]
        ms = timed(opt.step)
        print(f"  {name:24s} {ms:7.1f} ms")
        del opt
        torch.cuda.empty_cache()
    gap = max(float((u.float() - v.float()).abs().max() / v.float().abs().max())
              for u, v in zip(results["AdamW fused"], results["AdamW foreach"]))
    print(f"  fused vs foreach after one step, largest difference relative to the largest weight: {gap:.1e}")


if __name__ == "__main__":
    main()
