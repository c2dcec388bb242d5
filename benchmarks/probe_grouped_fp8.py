"""Why the grouped FP8 GEMM runs slower inside the MoE layer than in the kernel benchmark.

    python benchmarks/probe_grouped_fp8.py [--tokens 16384]

Records the arguments of the four grouped FP8 calls of one FP8 MoE layer forward+backward
(the layer of profile_moe.py), then times each call alone (triton.testing.do_bench) as
recorded, with its activation scales made row-major-contiguous, and with its operands made
contiguous. Prints shapes, strides, rows and TFLOP/s on the rows that hold tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_moe import benchmark_layer  # noqa: E402
from tables import print_tables  # noqa: E402

import posttrain.model.fp8_experts as fp8_experts  # noqa: E402


def main():
    from triton.testing import do_bench

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    moe, x, dy = benchmark_layer("fp8", a.tokens)

    K = fp8_experts.K
    original = K.grouped_fp8
    calls = []

    def recording(xq, xs, wq, ws, offsets, out_dtype=torch.bfloat16):
        calls.append((xq, xs, wq, ws, offsets, out_dtype))
        return original(xq, xs, wq, ws, offsets, out_dtype=out_dtype)

    for _ in range(2):  # warm (autotune) first, then record one pass
        calls.clear()
        K.grouped_fp8 = recording
        try:
            xi = x.detach().requires_grad_(True)
            moe(xi).backward(dy)
        finally:
            K.grouped_fp8 = original
    torch.cuda.synchronize()
    names = ["fwd gate+up", "fwd down", "dgrad down", "dgrad gate+up"]
    rows = []
    for name, (xq, xs, wq, ws, offs, od) in zip(names, calls):
        real = int(offs[-1])
        M, Kd = xq.shape
        N = wq.shape[1]
        flops = 2 * real * N * Kd
        variants = {"as recorded": (xq, xs, wq, ws),
                    "xs contiguous": (xq, xs.contiguous(), wq, ws),
                    "all contiguous": (xq.contiguous(), xs.contiguous(), wq.contiguous(), ws.contiguous())}
        for vname, (q, s, w, sw) in variants.items():
            ms = do_bench(lambda: original(q, s, w, sw, offs, out_dtype=od), warmup=25, rep=100)
            rows.append({"section": "grouped FP8 calls of the layer", "call": name, "variant": vname,
                         "M rows (real)": f"{M} ({real})", "N": N, "K": Kd,
                         "x strides": str(tuple(q.stride())), "xs strides": str(tuple(s.stride())),
                         "w strides": str(tuple(w.stride())), "ms": f"{ms:.3f}",
                         "TFLOP/s": f"{flops / ms / 1e9:.0f}"})
    print_tables(rows, ("grouped FP8 calls of the layer",))


if __name__ == "__main__":
    main()
