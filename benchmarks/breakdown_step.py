"""Where the bf16 / FP8 training step of bench_fp8_model.py spends its time, part by part.

    python benchmarks/breakdown_step.py [--sections fused,sdpa,router,parts] [--variants bf16,fp8] [--cprofile 25]

Times, forward + backward each (do_bench median, gradients set to None before every call as a
training step starts), on the step's shape (4 x 2048 tokens, hidden 2048):

* the attention sublayer of one block (input norm + MLA), the MoE sublayer of one MoE block
  (post-attention norm + MoE), the dense MLP sublayer of block 0, the head (final norm + LM
  head + cross-entropy), and the whole step; parts x layer counts against the step shows what
  the rest (embedding, residual adds, launch gaps) costs;
* the attention core alone (q/k 192 wide, v 128, causal) under each SDPA backend torch has
  here: the default choice, cuDNN, memory-efficient, and flash with v zero-padded to 192;
* the fused kernels the step uses (RMSNorm, cross-entropy, MLA q/k/v assembly) against the torch
  compositions they replace: error of both against float64, time of both (fwd + bwd);
* with --cprofile N: the CPU time to issue one step and the N Python functions with the most
  own time in it (`profile_step.host_cost`), which shows what the CPU does while the GPU waits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8_model import bench_ms, build_ours, hf_config, our_args, synthetic_batches  # noqa: E402
from profile_moe import kernel_time_us  # noqa: E402
from profile_step import host_cost  # noqa: E402

from posttrain.model.kernels.cross_entropy import cross_entropy  # noqa: E402
from posttrain.model.moe import MoE  # noqa: E402


def fwd_bwd(module_fn, params, x, dy):
    """A callable running module_fn(x) forward + backward with fresh gradients."""
    def run():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        module_fn(xi).backward(dy)
    return run


def sdpa_section(B=4, T=2048, H=16, qk=192, v=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, H, T, qk, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    vv = torch.randn(B, H, T, v, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(B, H, T, v, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 4 * B * H * T * T * (qk + v) / 2 * 3.5  # causal, fwd + bwd (bwd = 2.5x fwd)
    ref = None
    rows = []

    def attempt(name, backend, pad_v):
        nonlocal ref
        def run():
            qi, ki, vi = (t.detach().requires_grad_(True) for t in (q, k, vv))
            vin = F.pad(vi, (0, qk - v)) if pad_v else vi
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            with ctx:
                o = F.scaled_dot_product_attention(qi, ki, vin, is_causal=True)
            o = o[..., :v] if pad_v else o
            o.backward(dout)
            return o, qi.grad
        try:
            o, dq = run()
            ms = bench_ms(run, 100, 500)
        except Exception as e:  # a backend may refuse these head dims
            rows.append((name, f"refused: {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
            return
        if ref is None:
            ref = (o.float(), dq.float())
        err = max(float((o.float() - ref[0]).norm() / ref[0].norm()), float((dq.float() - ref[1]).norm() / ref[1].norm()))
        rows.append((name, f"{ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s, vs default {err:.1e}"))

    attempt("default", None, False)
    attempt("cudnn", SDPBackend.CUDNN_ATTENTION, False)
    attempt("efficient", SDPBackend.EFFICIENT_ATTENTION, False)
    attempt("flash, v padded to 192", SDPBackend.FLASH_ATTENTION, True)
    attempt("cudnn, v padded to 192", SDPBackend.CUDNN_ATTENTION, True)
    print("\n### attention core (B=4, T=2048, 16 heads, qk 192, v 128, causal), fwd + bwd")
    for name, r in rows:
        print(f"  {name:28s} {r}")


def fused_section():
    from posttrain.model.kernels import cross_entropy as CE
    from posttrain.model.kernels import mla_rope as MR
    from posttrain.model.kernels import rmsnorm as RN
    g = torch.Generator(device="cuda").manual_seed(2)

    def rnd(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def compare(name, fused, torch_fn, float64_fn, inputs, grads):
        """fused / torch_fn / float64_fn(*leaves) -> outputs; errors of outputs and input
        gradients vs float64, and fwd + bwd times."""
        def run(fn, cast=None):
            leaves = [(t.double() if cast and t.is_floating_point() else t).detach().requires_grad_(t.is_floating_point())
                      for t in inputs]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, [gr.double() if cast else gr for gr in grads])
            return [o.detach() for o in outs] + [t.grad for t in leaves if t.grad is not None]
        truth = run(float64_fn, cast=True)
        errs = {}
        for label, fn in (("fused", fused), ("torch", torch_fn)):
            got = run(fn)
            errs[label] = max(rel(a, b) for a, b in zip(got, truth))
            errs[label + " ms"] = bench_ms(lambda: run(fn), 50, 300)
        print(f"  {name:34s} torch {errs['torch ms']:6.3f} ms (err {errs['torch']:.1e})   "
              f"fused {errs['fused ms']:6.3f} ms (err {errs['fused']:.1e})   {errs['torch ms'] / errs['fused ms']:.2f}x")
        del truth

    print("\n### fused kernels vs the torch ops they replace (fwd + bwd, max relative error vs float64)")
    for n in (2048, 512):
        x, w = rnd(8192, n, scale=2.0), (1 + 0.1 * rnd(n, dtype=torch.float32)).to(torch.bfloat16)
        compare(f"RMSNorm [8192, {n}]", lambda a, b: RN._RMSNormFn.apply(a, b, 1e-6),
                lambda a, b: RN.rms_norm_reference(a, b, 1e-6), lambda a, b: RN.rms_norm_reference(a, b, 1e-6),
                [x, w], [rnd(8192, n)])
    logits = rnd(8192, 32000, scale=3.0)
    labels = torch.randint(0, 32000, (8192,), device="cuda", generator=g)
    labels[::17] = -100
    compare("cross-entropy [8192, 32000]", lambda a, lab: CE._CrossEntropyFn.apply(a, lab, -100),
            lambda a, lab: CE.cross_entropy_reference(a, lab), lambda a, lab: CE.cross_entropy_reference(a, lab),
            [logits, labels], [torch.tensor(1.0, device="cuda")])
    del logits
    B, T, H = 4, 2048, 16
    q = rnd(B, T, H * 192).view(B, T, H, 192)
    kv = rnd(B, T, H * 256).view(B, T, H, 256)
    k_pe = rnd(B, T, 576)[..., 512:]
    ang = torch.rand(B, T, 32, device="cuda", generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    compare("MLA q/k/v + rope [4, 2048, 16 heads]",
            lambda a, b, c: MR._MLAQKVFn.apply(a, b, c, cos, sin, 128),
            lambda a, b, c: MR.mla_qkv_reference(a, b, c, cos, sin, 128),
            lambda a, b, c: MR.mla_qkv_reference(a, b, c, cos.double(), sin.double(), 128),
            [q, kv, k_pe], [rnd(B, T, H, 192), rnd(B, T, H, 192), rnd(B, T, H, 128)])
    torch.cuda.empty_cache()


def router_section(N=8192, D=2048, E=64):
    """The router's logits x W^T (fwd + bwd) three ways, each against float64: float32 GEMMs on
    x.float() (the reference's math), ours (`moe.router_logits`: a Triton bf16 GEMM summing and
    writing float32, backward on the gradient split into bf16 hi + lo), and bf16 GEMMs both ways
    (the logits' gradient rounded to bf16). Isolated, these few-microsecond kernels time their
    launches; the GPU time inside a step is in profile_step.py --by-op. Then the fused route
    kernels checked against the torch route on the GPU, and the whole routing of one MoE layer
    (router, load count, slot layout, balance loss) fwd + bwd both ways."""
    from posttrain.model.moe import (Router, _FusedRoute, expert_counts, route, router_logits,
                                     sequence_balance_loss)
    from posttrain.model.dispatch import sorted_positions
    from posttrain.model.kernels import route as route_kernels
    from posttrain.model.kernels.route import slot_layout, slot_layout_reference
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    dy = torch.randn(N, E, device="cuda", generator=g)

    class Bf16Both(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return torch.mm(a, b.t(), out_dtype=torch.float32)

        @staticmethod
        def backward(ctx, d):
            a, b = ctx.saved_tensors
            d16 = d.to(a.dtype)
            return torch.mm(d16, b), torch.mm(d16.t(), a, out_dtype=torch.float32).to(b.dtype)

    def run(fn, xx, ww, dd):
        xi, wi = xx.detach().requires_grad_(True), ww.detach().requires_grad_(True)
        out = fn(xi, wi)
        out.backward(dd)
        return out, xi.grad, wi.grad

    truth = run(lambda a, b: a @ b.t(), x.double(), w.double(), dy.double())
    variants = {
        "float32 GEMMs (x.float())": lambda a, b: F.linear(a.float(), b.float()),
        "ours (Triton fp32-out, hi/lo bwd)": router_logits,
        "bf16 GEMMs both ways": Bf16Both.apply,
    }
    print(f"\n### router logits [{N}, {D}] x [{E}, {D}]^T, fwd + bwd (relative error vs float64: logits / dx / dW)")
    for name, fn in variants.items():
        try:
            got = run(fn, x, w, dy)
        except Exception as e:  # an op this torch lacks
            print(f"  {name:30s} unavailable: {str(e).splitlines()[0][:100]}")
            continue
        errs = " / ".join(f"{float((a.double() - b).norm() / b.norm()):.1e}" for a, b in zip(got, truth))
        print(f"  {name:30s} {bench_ms(lambda: run(fn, x, w, dy), 50, 300):6.3f} ms   err {errs}")
    args = our_args(hf_config(False))
    router = Router(args).cuda().to(torch.bfloat16)
    router.e_score_correction_bias.data = (torch.randn(E, device="cuda", generator=g) * 0.01).float()
    with torch.no_grad():
        router.weight.copy_(w)
    seq = torch.arange(4, device="cuda").repeat_interleave(N // 4)
    K = args.num_experts_per_tok
    dw = dy[:, :K].contiguous()

    def torch_routing(xi):
        """The torch route, counts, argsort layout and an index_add_ balance loss (the path before
        the fused kernels, and the CPU path now but for the loss)."""
        logits = router_logits(xi, router.weight)
        scores = logits.sigmoid()
        weights, idx = route(scores, router.e_score_correction_bias, args.n_group, args.topk_group, K,
                             args.norm_topk_prob, args.routed_scaling_factor)
        counts = expert_counts(idx, E)
        rows, _ = sorted_positions(idx)
        keep = torch.ones(N, device="cuda")
        normed = scores / scores.sum(-1, keepdim=True)
        p = torch.zeros(4, E, device="cuda").index_add_(0, seq, normed)
        c = torch.zeros(4 * E, device="cuda").index_add_(0, (seq[:, None] * E + idx).reshape(-1),
                                                           keep[:, None].expand(N, K).reshape(-1))
        loss = (c.view(4, E) * p).sum() * 1e-9
        return weights, idx, counts, rows, loss, logits

    def fused_routing(xi):
        r = router(xi)
        lay = slot_layout(r.idx, r.hist)
        loss = sequence_balance_loss(r.scores, r.idx, seq, E, 4)
        return r.weights, r.idx, lay.counts, lay.rows, loss, None

    def run_routing(fn):
        def go():
            router.weight.grad = None
            xi = x.detach().requires_grad_(True)
            weights, _, _, _, loss, _ = fn(xi)
            torch.autograd.backward([weights, loss], [dw, torch.ones((), device="cuda")])
            return xi.grad
        return go

    # correctness on the GPU: the fused kernels against the torch route on the same logits
    with torch.no_grad():
        logits = router_logits(x, router.weight)
        w_t, i_t = route(logits.sigmoid(), router.e_score_correction_bias, args.n_group, args.topk_group, K,
                         args.norm_topk_prob, args.routed_scaling_factor)
        w_f, i_f, s_f, hist, _ = route_kernels.route_forward(
            logits, router.e_score_correction_bias, args.n_group, args.topk_group, K, args.norm_topk_prob,
            args.routed_scaling_factor)
        same = (i_t == i_f).all(-1)
        lay = slot_layout(i_f, hist)
        ref = slot_layout_reference(i_f, E)
        print(f"  fused route: tokens with the same experts {float(same.float().mean()):.6f}; "
              f"weights max rel err {float(((w_f - w_t).abs() / w_t.abs())[same].max()):.1e}; "
              f"scores max abs err {float((s_f - logits.sigmoid()).abs().max()):.1e}; "
              f"layout equals argsort: {bool(torch.equal(lay.rows, ref.rows) and torch.equal(lay.counts, ref.counts))}")
    lt = logits.detach().requires_grad_(True)
    wt, _ = route(lt.sigmoid(), router.e_score_correction_bias, args.n_group, args.topk_group, K,
                  args.norm_topk_prob, args.routed_scaling_factor)
    (d_torch,) = torch.autograd.grad(wt, lt, dw)
    lf = logits.detach().requires_grad_(True)
    wf = _FusedRoute.apply(lf, router.e_score_correction_bias, None, args.n_group, args.topk_group, K,
                           args.norm_topk_prob, args.routed_scaling_factor)[0]
    (d_fused,) = torch.autograd.grad(wf, lf, dw)
    rows_ok = same.all()
    print(f"  fused route backward: rel err vs autograd {float((d_fused - d_torch).norm() / d_torch.norm()):.1e}"
          f"{'' if rows_ok else ' (some tokens routed differently)'}")
    for name, fn in (("torch route, index_add_ counts, argsort", torch_routing),
                     ("fused route + slot layout, one-hot GEMM loss", fused_routing)):
        print(f"  whole routing of a layer ({name}) fwd + bwd: {bench_ms(run_routing(fn), 50, 300):.3f} ms")
    torch.cuda.empty_cache()


def parts_section(variant: str, cprofile_rows: int):
    args = our_args(hf_config(False))
    B, T = 4, 2048
    ids = synthetic_batches(args.vocab_size, B, T, 1)[0]
    labels = ids.roll(-1, 1)
    m = build_ours(args, variant == "fp8")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, T, args.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn_like(x) * 1e-3
    cos, sin = m.rotary(torch.arange(T, device="cuda")[None].expand(B, T))
    dense, moe_block = m.layers[0], m.layers[1]
    n_moe = sum(isinstance(b.mlp, MoE) for b in m.layers)
    n_layers = len(m.layers)

    parts = {
        "attention sublayer": (lambda h: dense.self_attn(dense.input_layernorm(h), cos, sin),
                               list(dense.input_layernorm.parameters()) + list(dense.self_attn.parameters()), n_layers),
        "MoE sublayer": (lambda h: moe_block.mlp(moe_block.post_attention_layernorm(h)),
                         list(moe_block.post_attention_layernorm.parameters()) + list(moe_block.mlp.parameters()), n_moe),
        "dense MLP sublayer": (lambda h: dense.mlp(dense.post_attention_layernorm(h)),
                               list(dense.post_attention_layernorm.parameters()) + list(dense.mlp.parameters()),
                               n_layers - n_moe),
    }

    def head(h):
        logits = m.lm_head(m.norm(h))
        return cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))  # as Transformer.compute

    def head_run():
        for p in list(m.norm.parameters()) + list(m.lm_head.parameters()):
            p.grad = None
        xi = x.detach().requires_grad_(True)
        head(xi).backward()

    def step():
        m.zero_grad(set_to_none=True)
        m.compute(ids, labels=labels, with_mtp=False).loss.backward()

    print(f"\n### {variant}: parts of the step, fwd + bwd each, gradients set to None first")
    total = 0.0
    for name, (fn, params, count) in parts.items():
        ms = bench_ms(fwd_bwd(fn, params, x, dy), 100, 500)
        total += ms * count
        print(f"  {name:22s} {ms:7.2f} ms x {count} = {ms * count:7.2f} ms")
    ms = bench_ms(head_run, 100, 500)
    total += ms
    print(f"  {'head + loss':22s} {ms:7.2f} ms x 1 = {ms:7.2f} ms")
    step_ms = bench_ms(step, 300, 2000)
    print(f"  sum of parts {total:.1f} ms; whole step {step_ms:.1f} ms (rest {step_ms - total:.1f} ms)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    cuda = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    print(f"  GPU work items in one step: {sum(e.count for e in cuda)}, {kernel_time_us(prof) / 1e3:.1f} ms of GPU time")
    if cprofile_rows:
        print(host_cost(step, cprofile_rows))
    del m
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--cprofile", type=int, default=25)
    p.add_argument("--sections", default="fused,sdpa,parts")
    a = p.parse_args()
    sections = a.sections.split(",")
    if "fused" in sections:
        fused_section()
    if "sdpa" in sections:
        sdpa_section()
    if "router" in sections:
        router_section()
    if "parts" not in sections:
        return
    for variant in a.variants.split(","):
        parts_section(variant, a.cprofile)


if __name__ == "__main__":
    main()
