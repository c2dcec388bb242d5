"""How much of the bf16 step's wall time is launch overhead: the same forward + backward replayed
from one CUDA graph.

    python benchmarks/probe_cuda_graph_step.py [--variants bf16,fp8] [--capture-error-mode global]

The step of bench_fp8_model.py (4 x 2048 tokens, gradients set to None first) is timed as the
trainer runs it (eager), then captured whole (forward and backward; the MoE forward makes no
host sync, shapes are static) and replayed. The replayed loss and gradients are checked against
an eager step on the same batch first. Graph replay removes the CPU from the loop and most of
the gaps between kernels; what remains is GPU work. This is a measurement, not a training path:
the trainer does not capture graphs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import PEAK_BF16, bench_ms, build_ours, hf_config, our_args, synthetic_batches  # noqa: E402

from posttrain.model.counting import training_flops_per_token  # noqa: E402


def grad_differences(names, params, want) -> list[tuple[float, str]]:
    """(relative difference of each parameter's gradient from want, name), largest first."""
    out = [(float((q.grad.float() - w.float()).norm() / w.float().norm().clamp(min=1e-30)), n)
           for n, q, w in zip(names, params, want) if q.grad is not None]
    return sorted(out, reverse=True)


def bisect(args):
    """Which part of the step can be captured: each sublayer of block 0 / block 1 and the head,
    forward only and forward + backward, each in its own graph after an eager warm-up."""
    m = build_ours(args, False)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 2048, args.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    cos, sin = m.rotary(torch.arange(2048, device="cuda")[None].expand(4, 2048))
    labels = torch.randint(0, args.vocab_size, (4 * 2048,), device="cuda", generator=g)
    from posttrain.model.kernels.cross_entropy import cross_entropy
    parts = {
        "input norm": lambda h: m.layers[0].input_layernorm(h),
        "MLA": lambda h: m.layers[0].self_attn(h, cos, sin),
        "dense MLP": lambda h: m.layers[0].mlp(h),
        "MoE router": lambda h: m.layers[1].mlp.gate(h.view(-1, h.shape[-1]))[0],
        "MoE": lambda h: m.layers[1].mlp(h),
        "shared experts": lambda h: m.layers[1].mlp.shared_experts(h),
        "head + loss": lambda h: cross_entropy(m.lm_head(h).view(-1, args.vocab_size), labels),
    }
    for name, fn in parts.items():
        for backward in (False, True):
            def run():
                m.zero_grad(set_to_none=True)
                xi = x.detach().requires_grad_(backward)
                out = fn(xi)
                m.balance_loss()  # take the MoE layer's balance loss, as compute() does
                if backward:
                    out.float().sum().backward()
            try:
                for _ in range(2):
                    run()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                graph.replay()
                torch.cuda.synchronize()
                result = "ok"
            except Exception as e:
                result = f"FAILS: {str(e).splitlines()[0][:120]}"
                torch.cuda.synchronize()
            print(f"  capture {name:15s} {'fwd+bwd' if backward else 'fwd':8s} {result}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--capture-error-mode", default="global", choices=["global", "thread_local", "relaxed"])
    p.add_argument("--bisect", action="store_true", help="which parts of the step capture")
    a = p.parse_args()
    args = our_args(hf_config(False))
    if a.bisect:
        bisect(args)
        return
    B, T = 4, 2048
    ids = synthetic_batches(args.vocab_size, B, T, 1)[0]
    labels = ids.roll(-1, 1)
    fpt = training_flops_per_token(args, T)
    for variant in a.variants.split(","):
        m = build_ours(args, variant == "fp8")
        names, params = zip(*[(n, q) for n, q in m.named_parameters() if q.requires_grad])

        def step():
            m.zero_grad(set_to_none=True)
            loss = m.compute(ids, labels=labels, with_mtp=False).loss
            loss.backward()
            return loss

        eager_ms = bench_ms(step, 300, 2000)
        want_loss = step().detach().clone()
        want_grads = [q.grad.detach().clone() for q in params]
        step()  # a second eager step on the same batch: the run-to-run floor of the comparison
        floor = grad_differences(names, params, want_grads)
        # warm up on a side stream (autotuning, cuBLAS workspaces), then capture one step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        m.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=a.capture_error_mode):
                loss = m.compute(ids, labels=labels, with_mtp=False).loss
                loss.backward()
        except Exception as e:  # report where capture stopped, then go on with the next variant
            import traceback
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
            print(f"### {variant}: capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print("    at " + " <- ".join(reversed(frames[-8:])))
            del graph, m
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            continue
        graph.replay()
        torch.cuda.synchronize()
        loss_err = float((loss.detach() - want_loss).abs() / want_loss.abs())
        diffs = grad_differences(names, params, want_grads)
        graph_ms = bench_ms(graph.replay, 300, 2000)
        for name, ms in (("eager", eager_ms), ("CUDA graph replay", graph_ms)):
            tok_s = B * T / ms * 1e3
            print(f"### {variant} {name}: {ms:.1f} ms, {tok_s:,.0f} tokens/s, MFU {tok_s * fpt / PEAK_BF16:.1%}")
        print(f"    replay vs eager step: loss {loss_err:.1e} relative, largest gradient difference "
              f"{diffs[0][0]:.1e} ({diffs[0][1]}); eager vs eager: {floor[0][0]:.1e} ({floor[0][1]})")
        del graph, m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
