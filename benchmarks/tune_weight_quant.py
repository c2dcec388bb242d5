"""The 128x128 weight quantisation with its transposed copy (kernels/quant.py): variants side by side.

    python benchmarks/tune_weight_quant.py

Every FP8 forward quantises each weight twice over (row blocks for the forward GEMM and the
transposed copy the input gradient reads); per training step of the V3-shaped benchmark model
that is 4.3B parameters. Times, at the routed experts' gate/up [64, 2816, 2048] and down
[64, 2048, 1408] and at a dense [5632, 2048]:

* `current`    the kernel as shipped, at several warp counts (one 128x128 block per program;
               the input tile is transposed and quantised a second time for the second store);
* `rows`       the same kernel without the transposed copy (the floor: 3 of the 4 bytes moved);
* `trans_fp8`  transposes the FP8 tile instead (what the kernel did before: 1.55 TB/s on 16
               warps against 2.1 for the shipped one, RESULTS.md);
* `reload`     reads the block a second time through transposed pointers (from L2) for the
               second copy, so the compiler chooses both layouts;

each checked bit for bit against `current`, with TB/s of the bytes a pass must move
(2 in, 2 out per element with the transposed copy).
"""

from __future__ import annotations

import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from posttrain.model.kernels import quant as Q  # noqa: E402


tl = None  # bound with the helpers below before the variants are jitted (they read module globals)


def trans_fp8(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, NB, KB):
    pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    w = tl.load(w_ptr + e * N * K + rows[:, None] * K + cols[None, :]).to(tl.float32)
    amax = _absmax(w, None)
    q, s = _quant_tile(w, amax, False)
    tl.store(q_ptr + e * N * K + rows[:, None] * K + cols[None, :], q)
    tl.store(s_ptr + (e * NB + pid_n) * KB + pid_k, s)
    tl.store(qt_ptr + e * N * K + cols[:, None] * N + rows[None, :], tl.trans(q))
    tl.store(st_ptr + (e * KB + pid_k) * NB + pid_n, s)


def reload(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, NB, KB):
    pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    base = w_ptr + e * N * K
    w = tl.load(base + rows[:, None] * K + cols[None, :]).to(tl.float32)
    amax = _absmax(w, None)
    q, s = _quant_tile(w, amax, False)
    tl.store(q_ptr + e * N * K + rows[:, None] * K + cols[None, :], q)
    tl.store(s_ptr + (e * NB + pid_n) * KB + pid_k, s)
    wt = tl.load(base + cols[:, None] + rows[None, :] * K).to(tl.float32)  # [k, n], from L2
    qt, _ = _quant_tile(wt, amax, False)
    tl.store(qt_ptr + e * N * K + cols[:, None] * N + rows[None, :], qt)
    tl.store(st_ptr + (e * KB + pid_k) * NB + pid_n, s)


def _variant_kernels():
    built = Q.build()
    globals().update(tl=built.tl, _absmax=Q._absmax, _quant_tile=Q._quant_tile)
    return {"trans_fp8": built.triton.jit(trans_fp8), "reload": built.triton.jit(reload)}


def main():
    shapes = {"experts gate/up": (64, 2816, 2048), "experts down": (64, 2048, 1408), "dense": (1, 5632, 2048)}
    kernels = _variant_kernels()
    base_warps = Q._WEIGHT_WARPS
    print(f"### weight quantisation with the transposed copy (current: {base_warps} warps)")
    for label, (E, N, K) in shapes.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        nbytes = 4 * w.numel()
        want = Q.weight_quant_t_triton([w])
        cells = []
        for warps in (4, 8, 16, 32):
            Q._WEIGHT_WARPS = warps
            us = do_bench(lambda: Q.weight_quant_t_triton([w]), warmup=50, rep=300, return_mode="median") * 1e3
            got = Q.weight_quant_t_triton([w])
            same = all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                                   b.view(torch.uint8) if b.dtype != torch.float32 else b) for a, b in zip(got, want))
            cells.append(f"current/{warps}w {us:7.1f} us {nbytes / us / 1e6:4.2f} TB/s{'' if same else ' DIFFERS'}")
        Q._WEIGHT_WARPS = base_warps
        us = do_bench(lambda: Q.weight_quant_triton(w), warmup=50, rep=300, return_mode="median") * 1e3
        cells.append(f"rows {us:7.1f} us {3 * w.numel() / us / 1e6:4.2f} TB/s (3 B/elem)")
        NB, KB = N // 128, K // 128
        for name, kern in kernels.items():
            for warps in (4, 8, 16):
                q, s, qt, st = (torch.empty_like(t) for t in want)

                def run():
                    kern[(NB, KB, E)](w, q, s, qt, st, N, K, NB, KB, num_warps=warps)
                us = do_bench(run, warmup=50, rep=300, return_mode="median") * 1e3
                run()
                same = all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                                       b.view(torch.uint8) if b.dtype != torch.float32 else b)
                           for a, b in zip((q, s, qt, st), want))
                cells.append(f"{name}/{warps}w {us:7.1f} us {nbytes / us / 1e6:4.2f} TB/s{'' if same else ' DIFFERS'}")
        print(f"\n  {label} [{E}, {N}, {K}]")
        for c in cells:
            print("    " + c, flush=True)


if __name__ == "__main__":
    main()
