"""Tile sizes of the dispatch/combine kernels (kernels/permute.py) at the MoE layer's shapes.

    python benchmarks/tune_permute.py

Times each of the four passes (dispatch, combine = weighted gather-sum, dispatch backward =
gather-sum, combine backward) per (BLOCK_D, num_warps), checked equal to the current tiles'
output, and prints TB/s of the bytes each pass must move.
"""
from __future__ import annotations

import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from posttrain.model.dispatch import sorted_positions  # noqa: E402
from posttrain.model.kernels import permute as P  # noqa: E402

VARIANTS = [(1024, 8), (2048, 8), (2048, 16), (1024, 4), (512, 4)]


def main():
    base_meta = P._meta
    for tokens in (8192, 16384):
        E, K, D = 64, 6, 2048
        g = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.rand(tokens, E, device="cuda", generator=g).topk(K, dim=-1).indices
        rows, _ = sorted_positions(idx)
        x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, generator=g)
        buf = torch.randn(tokens * K, D, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.rand(tokens, K, device="cuda", generator=g)
        dout = torch.randn_like(x)
        passes = {
            "dispatch": (lambda: P.dispatch_triton(x, rows, tokens * K), 2 * (tokens * D + tokens * K * D)),
            "combine": (lambda: P.combine_triton(buf, rows, w), 2 * (tokens * D + tokens * K * D)),
            "dispatch bwd": (lambda: P.dispatch_backward_triton(buf, rows), 2 * (tokens * D + tokens * K * D)),
            "combine bwd": (lambda: P.combine_backward_triton(dout, buf, rows, w), 2 * (tokens * D + 2 * tokens * K * D)),
        }
        want = {name: fn() for name, (fn, _) in passes.items()}
        print(f"\n### {tokens} tokens, top-{K}, D={D}")
        for block_d, warps in VARIANTS:
            def meta(rows_NK, D_, interpret, _b=block_d, _w=warps):
                m = base_meta(rows_NK, D_, interpret)
                m.update(BLOCK_D=_b, num_warps=_w)
                return m
            P._meta = meta
            cells = []
            for name, (fn, nbytes) in passes.items():
                got = fn()
                same = all(torch.equal(a, b) for a, b in zip(got if isinstance(got, tuple) else (got,),
                                                             want[name] if isinstance(want[name], tuple) else (want[name],)))
                us = do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
                cells.append(f"{name} {us:6.1f} us {nbytes / us / 1e6:4.2f} TB/s{'' if same else ' DIFFERS'}")
            print(f"  BLOCK_D {block_d:5d} warps {warps:2d}: " + " | ".join(cells))
        P._meta = base_meta


if __name__ == "__main__":
    main()
