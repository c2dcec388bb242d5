"""The bf16 grouped GEMM in Gluon (kernels/grouped_wgmma16.py) against torch._grouped_mm.

    python benchmarks/bench_grouped_bf16.py [--configs 128x5,256x3,128x4p]

Checks first, on small ragged cases (experts with no rows or fewer than 128, rows past the
last expert, N not a multiple of the tile), both operand orders against a float64 loop over
experts. Then times the MoE layer's forward and input-gradient GEMMs at 16,384 tokens x
top-6 over 64 experts with routing-like uneven counts (no padding): torch._grouped_mm (the
anchor, what the bf16 layer runs now) and the Gluon kernel per BLOCK_N x stages (a trailing p:
the ping-pong schedule, each warpgroup on whole tiles in turn; else cooperative), with the
tile table built inside the timed call. Prints TFLOP/s and the ratio to the anchor.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_kernels import bench_ms, rel_err, uneven_counts  # noqa: E402

from posttrain.model.kernels.grouped_wgmma16 import grouped_gemm_bf16_wgmma  # noqa: E402


def reference(x, w, counts, k_major):
    out = torch.zeros(x.shape[0], w.shape[1] if k_major else w.shape[2], dtype=torch.float64, device=x.device)
    start = 0
    for e, c in enumerate(counts.tolist()):
        we = w[e].double()
        out[start:start + c] = x[start:start + c].double() @ (we.t() if k_major else we)
        start += c
    return out, start


def check(configs):
    g = torch.Generator(device="cuda").manual_seed(1)
    cases = [([0, 5, 130, 0, 257, 64], 192, 200), ([300, 1, 0, 127, 128], 128, 2816), ([40], 64, 8)]
    for counts, K, N in cases:
        counts = torch.tensor(counts)
        M = int(counts.sum()) + 37  # rows past the last expert stay unwritten
        offsets = torch.cumsum(counts, 0).to(torch.int32).cuda()
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        for k_major in (True, False):
            shape = (len(counts), N, K) if k_major else (len(counts), K, N)
            w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
            ref, used = reference(x, w, counts, k_major)
            for bn, stages, ping in configs:
                got = grouped_gemm_bf16_wgmma(x, w, offsets, k_major=k_major, block_n=bn, stages=stages, pingpong=ping)
                err = rel_err(got[:used], ref[:used])
                ok = err < 1e-2
                print(f"  check counts={counts.tolist()} K={K} N={N} k_major={k_major} {bn}x{stages}: "
                      f"{'p' if ping else ''} rel err {err:.1e} {'ok' if ok else 'FAILS'}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="128x4,256x3,128x4p,128x3p")
    a = p.parse_args()
    configs = [(int(c.split("x")[0]), int(c.split("x")[1].rstrip("p")), c.endswith("p")) for c in a.configs.split(",")]
    check(configs)
    E, tokens, top_k, D, I = 64, 16384, 6, 2048, 1408
    counts = uneven_counts(tokens, top_k, E, 3)
    M = int(counts.sum())
    offsets = torch.cumsum(counts, 0).to(torch.int32).cuda()
    g = torch.Generator(device="cuda").manual_seed(2)
    shapes = {  # name: (K, N, k_major); k_major=False is W [E, K, N] read as it is (dx = dy W_e)
        "gate/up forward": (D, 2 * I, True),
        "down forward": (I, D, True),
        "down input grad": (D, I, False),
        "gate/up input grad": (2 * I, D, False),
    }
    print(f"\n### grouped bf16 GEMM, {E} experts, {M} rows (uneven), H100 TFLOP/s of real rows")
    for name, (K, N, k_major) in shapes.items():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        w_in = w if k_major else w.transpose(1, 2).contiguous()  # [E, K, N] for the input-gradient form
        flops = 2 * M * N * K
        anchor_w = w.transpose(1, 2)  # torch._grouped_mm takes [E, K, N] (strided view as the layer passes)
        ref = torch._grouped_mm(x, anchor_w, offs=offsets)
        ms0 = bench_ms(lambda: torch._grouped_mm(x, anchor_w, offs=offsets))
        cells = [f"torch._grouped_mm {ms0:.3f} ms {flops / ms0 / 1e9:.0f}"]
        for bn, stages, ping in configs:
            fn = lambda: grouped_gemm_bf16_wgmma(x, w_in, offsets, k_major=k_major, block_n=bn,  # noqa: E731
                                                 stages=stages, pingpong=ping)
            got = fn()
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            ms = bench_ms(fn)
            cells.append(f"gluon {bn}x{stages}{'p' if ping else ''} {ms:.3f} ms {flops / ms / 1e9:.0f} ({ms0 / ms:.2f}x, vs anchor {err:.0e})")
        print(f"  {name:20s} K={K} N={N}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
