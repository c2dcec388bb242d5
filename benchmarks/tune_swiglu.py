"""Tile sizes of the SwiGLU kernels (kernels/swiglu.py) at the routed experts' shape.

    python benchmarks/tune_swiglu.py [--rows 98304] [--inter 1408]

Times the forward and backward, plain and with per-row gate weights (the weighted backward
walks whole rows for the weights' gradient), per (BLOCK_M, BLOCK_I, num_warps); checks each
output equal to the current tiles' and prints TB/s of the bytes each pass must move.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from posttrain.model.kernels import swiglu as S  # noqa: E402

VARIANTS = [(16, 128, 4), (32, 128, 4), (8, 256, 4), (16, 256, 4), (16, 256, 8), (32, 256, 8), (64, 128, 8),
            (4, 512, 4), (8, 512, 8)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=98304)
    p.add_argument("--inter", type=int, default=1408)
    a = p.parse_args()
    M, I = a.rows, a.inter
    g = torch.Generator(device="cuda").manual_seed(0)
    gu = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16, generator=g)
    dh = torch.randn(M, I, device="cuda", dtype=torch.bfloat16, generator=g)
    row_w = torch.rand(M, device="cuda", generator=g)
    gate, up = gu[:, :I], gu[:, I:]
    passes = {
        "fwd": (lambda: S.swiglu_forward_triton(gate, up), 6 * M * I),
        "fwd weighted": (lambda: S.swiglu_forward_triton(gate, up, row_w), 6 * M * I + 4 * M),
        "bwd": (lambda: S.swiglu_backward_triton(gate, up, dh), 10 * M * I),
        "bwd weighted": (lambda: S.swiglu_backward_triton(gate, up, dh, row_w=row_w), 10 * M * I + 8 * M),
    }
    base = (S._BLOCK_M, S._BLOCK_I, S._NUM_WARPS)
    want = {name: fn() for name, (fn, _) in passes.items()}
    print(f"### SwiGLU [{M}, 2x{I}] bf16 (current tiles {base})")
    for bm, bi, warps in VARIANTS:
        S._BLOCK_M, S._BLOCK_I, S._NUM_WARPS = bm, bi, warps
        cells = []
        for name, (fn, nbytes) in passes.items():
            got = fn()
            got, ref = (got if isinstance(got, tuple) else (got,)), (want[name] if isinstance(want[name], tuple) else (want[name],))
            # the weights' gradient sums a row in chunks of BLOCK_I: another order, float32
            same = all(torch.equal(x, y) if x.dtype != torch.float32 else torch.allclose(x, y, rtol=1e-5, atol=1e-3)
                       for x, y in zip(got, ref))
            us = do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
            cells.append(f"{name} {us:6.1f} us {nbytes / us / 1e6:4.2f} TB/s{'' if same else ' DIFFERS'}")
        print(f"  {bm:3d} x {bi:4d}, {warps} warps: " + " | ".join(cells), flush=True)
    S._BLOCK_M, S._BLOCK_I, S._NUM_WARPS = base


if __name__ == "__main__":
    main()
