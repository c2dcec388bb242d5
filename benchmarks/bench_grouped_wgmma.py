"""The grouped FP8 GEMM kernels side by side on one Hopper GPU: check, then time.

    python benchmarks/bench_grouped_wgmma.py [--quick]

Checks first, on small ragged cases (an expert with no rows, K and N not multiples of 128,
rows past the last expert): the Gluon kernels of kernels/grouped_wgmma.py ("plain": one
partition; "ws": a TMA warp and two MMA warpgroups) against the torch reference. Then times,
on 64 experts with routing-like uneven counts (16,384 tokens x top-6) in the 128-aligned
layout the MoE layer uses, the forward shapes (K=2048, N=1408 and the fused gate+up N=2816)
and the input-gradient shape (K=1408, N=2048): torch._grouped_mm bf16 on the unpadded rows
(the anchor), our Triton FP8 kernel, and the Gluon kernels at several pipeline depths.
TFLOP/s count the real rows only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_kernels import bench_ms, rel_err, uneven_counts  # noqa: E402
from tables import print_tables  # noqa: E402

from posttrain.model import kernels as K  # noqa: E402
from posttrain.model.kernels import grouped  # noqa: E402
from posttrain.model.kernels.grouped_wgmma import grouped_gemm_fp8_wgmma  # noqa: E402

ROWS: list[dict] = []


def row(section: str, **kv):
    kv["section"] = section
    ROWS.append(kv)
    print(kv, flush=True)


def padded_problem(counts: torch.Tensor, Kd: int, N: int, seed: int):
    """x in the 128-aligned layout (padding rows zero), its FP8 form, weights and offsets."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    E = counts.shape[0]
    layout = K.pad_offsets_to(counts.cuda(), 128, num_rows=int(counts.sum()))
    x = torch.randn(int(counts.sum()), Kd, device="cuda", dtype=torch.bfloat16, generator=g)
    x_pad = x.new_zeros(layout.num_rows, Kd)
    x_pad[layout.dest_rows] = x
    w = torch.randn(E, N, Kd, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    xq, xs = K.act_quant(x_pad)
    wq, ws = K.weight_quant(w)
    return x, w, layout, xq, xs, wq, ws


def check_section():
    cases = [  # (counts, K, N): an empty expert, ragged K and N, a tail past the last expert
        (torch.tensor([300, 0, 129, 1, 640, 77, 0, 250]), 208, 200),
        (torch.tensor([128, 256, 0, 5]), 2048, 1408),
        (torch.tensor([0, 0, 900]), 384, 136),
    ]
    for i, (counts, Kd, N) in enumerate(cases):
        _, _, layout, xq, xs, wq, ws = padded_problem(counts, Kd, N, seed=i)
        ref = K.grouped_gemm_fp8_reference(xq, xs, wq, ws, layout.offsets, torch.float32)
        for variant in ("plain", "ws"):
            try:
                out = grouped_gemm_fp8_wgmma(xq, xs, wq, ws, layout.offsets, torch.bfloat16, variant=variant)
                torch.cuda.synchronize()
                err = rel_err(out, ref.double())
                tail_zero = bool((out[int(layout.offsets[-1]):] == 0).all())
                row("check", case=i, variant=variant, rel_err=f"{err:.2e}", tail_zero=tail_zero,
                    ok=err < 1e-2 and tail_zero)
            except Exception as e:
                row("check", case=i, variant=variant, error=f"{type(e).__name__}: {e}"[:300])


def timing_section(tokens, top_k, E, D, I, stages):
    counts = uneven_counts(tokens, top_k, E, 3)
    M = int(counts.sum())
    for label, (Kd, N) in {"fwd down-like (K=2048,N=1408)": (D, I), "fwd gate+up (K=2048,N=2816)": (D, 2 * I),
                           "dgrad (K=1408,N=2048)": (I, D)}.items():
        x, w, layout, xq, xs, wq, ws = padded_problem(counts, Kd, N, seed=5)
        offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
        ref = torch.cat([x[s:e].double() @ w[i].double().T for i, (s, e) in
                         enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
        flop = 2 * M * N * Kd

        def real_rows(out):
            return out[layout.dest_rows]

        variants = {
            "torch._grouped_mm bf16": (lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), False),
            "Triton FP8 (ours)": (lambda: grouped.grouped_gemm_fp8(xq, xs, wq, ws, layout.offsets), True),
            "Gluon plain, 4 stages": (lambda: grouped_gemm_fp8_wgmma(xq, xs, wq, ws, layout.offsets,
                                                                     variant="plain", stages=4), True),
        }
        for s in stages:
            variants[f"Gluon ws, {s} stages"] = (
                lambda s=s: grouped_gemm_fp8_wgmma(xq, xs, wq, ws, layout.offsets, variant="ws", stages=s), True)
        anchor = None
        for name, (fn, padded) in variants.items():
            try:
                out = fn()
                err = rel_err(real_rows(out) if padded else out, ref)
                ms = bench_ms(fn)
            except Exception as e:
                row("grouped", shape=label, variant=name, error=f"{type(e).__name__}: {e}"[:300])
                continue
            tflops = flop / ms / 1e9
            anchor = anchor or tflops
            row("grouped", shape=label, variant=name, ms=round(ms, 4), tflops=round(tflops, 1),
                vs_anchor=round(tflops / anchor, 3), rel_err=f"{err:.2e}")
        del ref


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stages", default="3,4,5,6")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    check_section()
    stages = [int(s) for s in a.stages.split(",")]
    timing_section(*((1024, 6, 8, 256, 128) if a.quick else (16384, 6, 64, 2048, 1408)), stages)
    print_tables(ROWS, ("check", "grouped"))


if __name__ == "__main__":
    main()
