"""CPU cost of issuing each piece of a MoE layer's routing (microseconds per call).

    python benchmarks/launch_cost.py [--tokens 16384] [--calls 300]

The routing's kernels run for microseconds on the GPU, so the layer waits on the CPU that
issues them: what matters is the host time per call, which this measures (calls issued
back to back, one synchronisation at the end; the GPU work of each call is far shorter than
its issue, so the wall time per call is the CPU's). Torch ops and our Triton kernels side by
side, on the benchmark shape of bench_fp8_model.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import hf_config, our_args  # noqa: E402

from posttrain.model.dispatch import sorted_positions  # noqa: E402
from posttrain.model.kernels import route as RK  # noqa: E402
from posttrain.model.moe import (Router, expert_counts, route, router_logits,  # noqa: E402
                                 sequence_balance_loss)


def per_call_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args()
    args = our_args(hf_config(False))
    N, E, K = a.tokens, args.n_routed_experts, args.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, args.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    router = Router(args).cuda().to(torch.bfloat16)
    bias = torch.randn(E, device="cuda", generator=g) * 0.01
    logits = router_logits(x, router.weight.detach())
    scores = logits.sigmoid()
    w, idx, s, hist, _ = RK.route_forward(logits, bias, 1, 1, K, True, 2.5)
    seq = torch.zeros(N, dtype=torch.long, device="cuda")
    dw = torch.randn(N, K, device="cuda", generator=g)
    pieces = {
        "torch.sigmoid (one torch op)": lambda: logits.sigmoid(),
        "torch route (sigmoid..scale)": lambda: route(logits.sigmoid(), bias, 1, 1, K, True, 2.5),
        "fused route_forward (1 Triton)": lambda: RK.route_forward(logits, bias, 1, 1, K, True, 2.5),
        "expert_counts + sorted_positions": lambda: (expert_counts(idx, E), sorted_positions(idx)),
        "slot_layout (2 Triton)": lambda: RK.slot_layout(idx, hist),
        "route_backward (1 Triton)": lambda: RK.route_backward(s, idx, dw, None, True, 2.5),
        "router_logits fwd (mm_f32)": lambda: router_logits(x, router.weight.detach()),
        "sequence_balance_loss": lambda: sequence_balance_loss(scores, idx, seq, E, 1),
    }
    print(f"\n### CPU cost per call, {N} tokens, E={E}, K={K} ({a.calls} calls each)")
    for name, fn in pieces.items():
        print(f"  {name:36s} {per_call_us(fn, a.calls):8.1f} us")
    gpu_section(N, 50)


def gpu_us(fn, calls: int, per_kernel: list | None = None) -> float:
    """GPU kernel time per call (microseconds), from torch.profiler; per_kernel, when given,
    receives (name, us per call) of each kernel."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    if per_kernel is not None:
        per_kernel.extend((e.key[:40], e.self_device_time_total / calls) for e in kernels)
    return sum(e.self_device_time_total for e in kernels) / calls


def gpu_section(tokens: int, calls: int):
    """GPU time of the fused routing against the torch routing, at this benchmark's 64 experts
    (top-6) and at DeepSeek-V3's 256 (top-8 within 4 of 8 groups)."""
    print(f"\n### GPU time per call, {tokens} tokens (torch.profiler kernel sums)")
    for E, K, G, TG in ((64, 6, 1, 1), (256, 8, 8, 4)):
        g = torch.Generator(device="cuda").manual_seed(E)
        logits = torch.randn(tokens, E, device="cuda", generator=g)
        bias = torch.randn(E, device="cuda", generator=g) * 0.01
        w, idx, s, hist, _ = RK.route_forward(logits, bias, G, TG, K, True, 2.5)
        dw = torch.randn(tokens, K, device="cuda", generator=g)
        w_t, i_t = route(logits.sigmoid(), bias, G, TG, K, True, 2.5)
        same = float((i_t == idx).all(-1).float().mean())
        rows_ok = bool(torch.equal(RK.slot_layout(idx, hist).rows, RK.slot_layout_reference(idx, E).rows))

        def torch_fwd():
            _, i = route(logits.sigmoid(), bias, G, TG, K, True, 2.5)
            expert_counts(i, E)
            sorted_positions(i)

        def fused_fwd():
            _, i, _, h, _ = RK.route_forward(logits, bias, G, TG, K, True, 2.5)
            RK.slot_layout(i, h)

        parts = []
        print(f"  E={E:3d} K={K} groups {G}/{TG}: torch route+counts+argsort {gpu_us(torch_fwd, calls):7.1f} us, "
              f"fused route+layout {gpu_us(fused_fwd, calls, parts):7.1f} us, fused backward "
              f"{gpu_us(lambda: RK.route_backward(s, idx, dw, None, True, 2.5), calls):6.1f} us; "
              f"same experts {same:.6f}, layout equals argsort {rows_ok}")
        print("    fused kernels: " + ", ".join(f"{name} {us:.1f} us" for name, us in parts))


if __name__ == "__main__":
    main()
