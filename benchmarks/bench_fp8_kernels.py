"""FP8 and grouped GEMM kernels on one GPU: check each variant, then time it, in one run.

    python benchmarks/bench_fp8_kernels.py [--quick] [--json OUT.json]

Sections (each prints a table):
  dense   FP8 GEMM at 8192^3 and the report's shapes: bf16 torch.matmul (anchor), cuBLAS
          blockwise FP8 (torch._scaled_mm, 1x128 x 128x128), our Triton FP8 GEMM, and the path
          our FP8 linear takes (`fp8_matmul`); TFLOP/s and relative error against float64.
  quant   activation quantisation (1x128), its transposed form, the SwiGLU-fused form and
          weight quantisation (128x128): TB/s counting bytes read + written.
  grouped per-expert GEMM, 64 experts with uneven token counts, the forward shape
          (K=2048, N=1408), the input-gradient shape (K=1408, N=2048) and the weight
          gradient: torch._grouped_mm bf16 (anchor), our Triton bf16 and our Triton FP8.
  permute the MoE layer's token dispatch + weighted combine, forward and backward: torch
          indexing (anchor) against the Triton kernels of kernels/permute.py.
Every variant is checked against a float64 reference on the same random inputs before it is
timed; a failed check is printed and the variant is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tables import print_tables  # noqa: E402

from posttrain.model import kernels as K  # noqa: E402
from posttrain.model.kernels import fp8_gemm as dense  # noqa: E402
from posttrain.model.kernels import grouped  # noqa: E402
from posttrain.model.kernels import quant  # noqa: E402


def bench_ms(fn, warmup_ms=100, rep_ms=400) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


ROWS: list[dict] = []


def row(section: str, **kv):
    kv["section"] = section
    ROWS.append(kv)
    print(json.dumps(kv), flush=True)


def dense_section(shapes):
    for M, N, Kd in shapes:
        g = torch.Generator(device="cuda").manual_seed(M + N + Kd)
        x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        ref = x.double() @ w.double().T
        flop = 2 * M * N * Kd
        xq, xs = K.act_quant(x)
        wq, ws = K.weight_quant(w)
        variants = {
            "bf16 torch.matmul": lambda: x @ w.T,
            "cuBLAS blockwise FP8": lambda: dense.scaled_mm_blockwise(xq, xs, wq, ws, torch.bfloat16),
            "Triton FP8 (ours)": lambda: dense.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, b_block=True),
            "fp8_matmul (FP8 linear's path)": lambda: K.fp8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16, b_block=True),
            "FP8 linear fwd incl. quant": lambda: K.fp8_matmul(*K.act_quant(x), wq, ws, out_dtype=torch.bfloat16, b_block=True),
        }
        anchor = None
        for name, fn in variants.items():
            try:
                err = rel_err(fn(), ref)
            except Exception as e:  # report, keep going
                row("dense", shape=f"{M}x{N}x{Kd}", variant=name, error=f"{type(e).__name__}: {e}"[:200])
                continue
            ms = bench_ms(fn)
            tflops = flop / ms / 1e9
            anchor = anchor or tflops
            row("dense", shape=f"{M}x{N}x{Kd}", variant=name, ms=round(ms, 4), tflops=round(tflops, 1),
                vs_bf16=round(tflops / anchor, 3), rel_err=f"{err:.2e}")
        del ref


def quant_section(M, Kd):
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16, generator=g)
    up = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(Kd, Kd, device="cuda", dtype=torch.bfloat16, generator=g)
    from posttrain.model.kernels import reference as R
    cases = {
        "act_quant 1x128": (lambda: quant.act_quant(x), lambda: R.act_quant(x), 2 * M * Kd + M * Kd + 4 * M * Kd // 128),
        "act_quant_t (128 tokens)": (lambda: quant.act_quant_t(x), lambda: R.act_quant_t(x), 3 * M * Kd + 4 * M * Kd // 128),
        "swiglu + act_quant": (lambda: quant.swiglu_act_quant(x, up), lambda: R.swiglu_act_quant(x, up), 5 * M * Kd + 4 * M * Kd // 128),
        "weight_quant 128x128": (lambda: quant.weight_quant(w), lambda: R.weight_quant(w), 3 * Kd * Kd),
        "weight_quant_t (q and q^T)": (lambda: quant.weight_quant_t(w[None])[2:], lambda: R.weight_quant_t([w[None]])[2:],
                                       4 * Kd * Kd),
        "copy (bandwidth anchor)": (lambda: x.clone(), None, 4 * M * Kd),
    }
    for name, (fn, ref_fn, nbytes) in cases.items():
        ok = "-"
        if ref_fn is not None:
            got, want = fn(), ref_fn()
            mism = max(float((q.float() != rq.float()).float().mean()) for q, rq in zip(got[0::2], want[0::2]))
            s_err = max(float(((s - rs).abs() / rs.abs().clamp(min=1e-30)).max()) for s, rs in zip(got[1::2], want[1::2]))
            ok = f"q mismatch {mism:.1e}, scale rel {s_err:.1e}"
        ms = bench_ms(fn)
        row("quant", shape=f"{M if 'weight' not in name else Kd}x{Kd}", variant=name, ms=round(ms, 4),
            tb_s=round(nbytes / ms / 1e9, 2), check=ok)
    # the FP8 experts' weights as one training step quantises them (gate and up into one
    # buffer, with the transpose), at each warp count of the one-block-per-program kernel
    E, I, D = 64, 1408, 2048
    wg, wu = (torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    default = quant._WEIGHT_WARPS
    for warps in (4, 8, 16):
        quant._WEIGHT_WARPS = warps
        ms = bench_ms(lambda: quant.weight_quant_t(wg, wu))
        row("quant", shape=f"{E}x{2 * I}x{D}", variant=f"weight_quant_t experts gate+up, {warps} warps",
            ms=round(ms, 4), tb_s=round(4 * E * 2 * I * D / ms / 1e9, 2), check="-")
    quant._WEIGHT_WARPS = default


def uneven_counts(tokens: int, top_k: int, E: int, seed: int) -> torch.Tensor:
    """Token counts per expert as routing gives them: log-normal skew, a few near-empty."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(E, generator=g) * 0.8)
    w[torch.randperm(E, generator=g)[:2]] = 0.01
    counts = (w / w.sum() * tokens * top_k).floor().long()
    counts[0] += tokens * top_k - counts.sum()
    return counts


def grouped_section(tokens, top_k, E, D, I):
    counts = uneven_counts(tokens, top_k, E, 3)
    offsets = torch.cumsum(counts, 0).to(torch.int32).cuda()
    M = int(counts.sum())
    g = torch.Generator(device="cuda").manual_seed(11)
    for label, (Kd, N) in {"fwd (K=2048,N=1408)": (D, I), "dgrad (K=1408,N=2048)": (I, D)}.items():
        x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(E, N, Kd, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        ref = torch.cat([x[s:e].double() @ w[i].double().T for i, (s, e) in
                         enumerate(zip([0] + offsets[:-1].tolist(), offsets.tolist()))])
        flop = 2 * M * N * Kd
        xq, xs = K.act_quant(x)
        wq, ws = K.weight_quant(w)
        variants = {
            "torch._grouped_mm bf16": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets),
            "Triton bf16 (ours)": lambda: grouped.grouped_gemm(x, w, offsets),
            "Triton FP8 (ours)": lambda: grouped.grouped_gemm_fp8(xq, xs, wq, ws, offsets),
            "Triton FP8 incl. act quant": lambda: grouped.grouped_gemm_fp8(*K.act_quant(x), wq, ws, offsets),
        }
        anchor = None
        for name, fn in variants.items():
            try:
                err = rel_err(fn(), ref)
            except Exception as e:
                row("grouped", shape=label, variant=name, error=f"{type(e).__name__}: {e}"[:200])
                continue
            ms = bench_ms(fn)
            tflops = flop / ms / 1e9
            anchor = anchor or tflops
            row("grouped", shape=label, variant=name, ms=round(ms, 4), tflops=round(tflops, 1),
                vs_anchor=round(tflops / anchor, 3), rel_err=f"{err:.2e}")
        del ref
    # weight gradient: dW[e] = dy_e^T x_e, offsets padded to 128 for the FP8 form
    padded = ((counts + 127) // 128) * 128
    poffs = torch.cumsum(padded, 0).to(torch.int32).cuda()
    Mp = int(padded.sum())
    x = torch.randn(Mp, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(Mp, I, device="cuda", dtype=torch.bfloat16, generator=g)
    starts = [0] + poffs[:-1].tolist()
    for e, (s, c) in enumerate(zip(starts, counts.tolist())):  # padding rows are zeros
        x[s + c: s + int(padded[e])] = 0
        dy[s + c: s + int(padded[e])] = 0
    ref = torch.stack([dy[s:e].double().T @ x[s:e].double() for s, e in zip(starts, poffs.tolist())])
    flop = 2 * M * I * D
    dyq_t, dys_t = K.act_quant_t(dy)
    xq_t, xs_t = K.act_quant_t(x)
    variants = {
        "torch._grouped_mm bf16": lambda: torch._grouped_mm(dy.T, x, offs=poffs),
        "Triton bf16 (ours)": lambda: grouped.grouped_gemm_wgrad(dy, x, poffs),
        "Triton FP8 (ours)": lambda: grouped.grouped_gemm_wgrad_fp8(dyq_t, dys_t, xq_t, xs_t, poffs),
        "Triton FP8, bf16 out (training)": lambda: grouped.grouped_gemm_wgrad_fp8(dyq_t, dys_t, xq_t, xs_t, poffs,
                                                                                   out_dtype=torch.bfloat16),
    }
    anchor = None
    for name, fn in variants.items():
        try:
            err = rel_err(fn(), ref)
        except Exception as e:
            row("grouped", shape="wgrad (N=1408,K=2048)", variant=name, error=f"{type(e).__name__}: {e}"[:200])
            continue
        ms = bench_ms(fn)
        tflops = flop / ms / 1e9
        anchor = anchor or tflops
        row("grouped", shape="wgrad (N=1408,K=2048)", variant=name, ms=round(ms, 4), tflops=round(tflops, 1),
            vs_anchor=round(tflops / anchor, 3), rel_err=f"{err:.2e}")


def permute_section(tokens, top_k, E, D):
    """The MoE layer's dispatch and combine, forward + backward: the torch indexing they
    replace (anchor) against the Triton kernels; outputs and gradients checked against the
    float32 references first."""
    from posttrain.model.dispatch import combine_tokens, dispatch_tokens, sorted_positions
    from posttrain.model.kernels import permute as P
    g = torch.Generator(device="cuda").manual_seed(5)
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:top_k] for _ in range(64)])
    idx = idx[torch.randint(0, 64, (tokens,), device="cuda", generator=g)]
    x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.rand(tokens, top_k, device="cuda", generator=g)
    dout = torch.randn_like(x)
    rows, order = sorted_positions(idx)
    N, Kk = idx.shape

    def torch_path():
        xi, wi = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        buf = xi[:, None].expand(N, Kk, D).reshape(N * Kk, D)[order]
        y = buf * 1.0  # stands in for the experts
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device="cuda")
        out = (y[unsort].float().view(N, Kk, D) * wi[..., None]).sum(1).to(x.dtype)
        out.backward(dout)
        return out, xi.grad, wi.grad

    def kernel_path():
        xi, wi = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = combine_tokens(dispatch_tokens(xi, rows, N * Kk) * 1.0, rows, wi)
        out.backward(dout)
        return out, xi.grad, wi.grad

    ref_out = P.combine_reference(P.dispatch_reference(x, rows, N * Kk), rows, w)
    nbytes = 2 * (2 * N * D + 2 * N * Kk * D) * 2  # fwd + bwd, each: x/out rows once, K copies once
    anchor = None
    for name, fn in {"torch indexing (before)": torch_path, "Triton dispatch/combine": kernel_path}.items():
        out, dx, dw = fn()
        check = f"out {rel_err(out, ref_out.double()):.1e}, dx vs torch {rel_err(dx, torch_path()[1].double()):.1e}"
        ms = bench_ms(fn)
        anchor = anchor or ms
        row("permute", shape=f"{tokens}x{D}, top-{top_k}", variant=name, ms=round(ms, 4),
            speedup=round(anchor / ms, 2), tb_s=round(nbytes / ms / 1e9, 2), check=check)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--sections", default="dense,quant,grouped,permute")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    sections = a.sections.split(",")
    if "dense" in sections:
        dense_section([(1024, 1024, 1024)] if a.quick else
                      [(8192, 8192, 8192), (4096, 7168, 2048), (4096, 7168, 16384), (4096, 2048, 7168)])
    if "quant" in sections:
        quant_section(*((1024, 1024) if a.quick else (16384, 7168)))
    if "grouped" in sections:
        grouped_section(*((1024, 6, 8, 256, 128) if a.quick else (16384, 6, 64, 2048, 1408)))
    if "permute" in sections:
        permute_section(*((1024, 6, 8, 256) if a.quick else (16384, 6, 64, 2048)))
    print_tables(ROWS, ("dense", "quant", "grouped", "permute"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
