"""MoE layer and training step on one GPU, ours (bf16, FP8) against transformers' DeepseekV3.

    python benchmarks/bench_fp8_model.py [--sections moe,step,loss] [--steps 200] [--quick]

moe   one MoE layer forward + backward: 64 routed experts top-6, 2 shared, hidden 2048, expert
      width 1408, 16,384 tokens, bf16. transformers' DeepseekV3MoE with
      config._experts_implementation "grouped_mm" (anchor) and "eager"; ours in bf16 and FP8.
      Ours is checked against transformers on the same weights and inputs first.
step  forward + backward of a V3-shaped model (hidden 2048, 8 layers, first dense, 16 heads,
      no q LoRA, kv_lora 512, 64 experts top-6 + 2 shared of width 1408, vocab 32000) on 4 x 2048
      tokens: transformers grouped_mm (anchor), ours bf16, ours FP8; tokens/s and MFU against
      989 TFLOP/s dense bf16 (H100 SXM). FLOPs per token = 6 x activated matmul parameters
      (counting.py: every dense weight, shared + top-k experts, router, LM head) plus causal
      attention 6 x T x heads x (qk_dim + v_dim) per layer.
Every timed call starts with the gradients set to None, as after an optimizer step
(`zero_grad(set_to_none=True)`), so backward writes them instead of adding to the last call's.
loss  the same model trained --steps AdamW steps in bf16 and in FP8 from the same init on the
      same batches (a synthetic bigram language); final-window mean loss, relative gap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tables import print_tables  # noqa: E402

from posttrain.model import ModelArgs, Transformer  # noqa: E402
from posttrain.model.counting import count_parameters, training_flops_per_token  # noqa: E402
from posttrain.model.fp8_training import enable_fp8_training  # noqa: E402
from posttrain.model.kernels import grouped  # noqa: E402
from posttrain.model.kernels.selection import selected  # noqa: E402
from posttrain.model.moe import MoE  # noqa: E402

PEAK_BF16 = 989e12
ROWS: list[dict] = []


def row(section, **kv):
    kv["section"] = section
    ROWS.append(kv)
    print(json.dumps(kv), flush=True)


def bench_ms(fn, warmup_ms=200, rep_ms=1000) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def hf_config(quick: bool, layers: int = 8):
    from transformers import DeepseekV3Config
    small = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, vocab_size=4096) if quick else {}
    base = dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
                q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
                rope_scaling=None, num_nextn_predict_layers=0, tie_word_embeddings=False)
    base.update(small)
    return DeepseekV3Config(**base)


def our_args(cfg) -> ModelArgs:
    d = cfg.to_dict()
    d["num_nextn_predict_layers"] = 0
    return ModelArgs.from_hf_config(d)


def set_experts_impl(cfg, impl):
    cfg._experts_implementation = impl
    return cfg


def triton_grouped(fn):
    """fn with the grouped FP8 GEMMs on the Triton kernel instead of the Gluon one."""
    def run(*args, **kwargs):
        with selected(grouped_fp8="triton"):
            return fn(*args, **kwargs)
    return run


def moe_section(quick):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = hf_config(quick)
    args = our_args(cfg)
    N = 2048 if quick else 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    ours = MoE(args).cuda()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.02)
        ours.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts, device="cuda", generator=g) * 0.01)
    ours = ours.to(torch.bfloat16).train()
    ours.gate.e_score_correction_bias.data = ours.gate.e_score_correction_bias.float()
    x = torch.randn(1, N, args.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn_like(x)

    def hf_moe(impl):
        m = DeepseekV3MoE(set_experts_impl(hf_config(quick), impl)).cuda().to(torch.bfloat16)
        sd = {}
        for name, t in ours.state_dict().items():
            sd[name] = t
        hf_sd = m.state_dict()
        mapped = {}
        for k in hf_sd:
            if k.startswith("experts."):
                # transformers 5 stores experts as we do: gate_up_proj [E, 2I, D], down_proj [E, D, I]
                if "gate_up_proj" in k:
                    mapped[k] = ours.experts.gate_up_proj.detach()
                elif "down_proj" in k:
                    mapped[k] = ours.experts.down_proj.detach()
            elif k in sd:
                mapped[k] = sd[k]
        missing = set(hf_sd) - set(mapped)
        if missing:
            raise RuntimeError(f"cannot map our MoE weights onto transformers' names: {sorted(missing)[:6]}")
        m.load_state_dict({k: v.to(hf_sd[k].dtype) for k, v in mapped.items()})
        return m.train()

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)  # a step's backward writes fresh gradients
            xi = x.detach().requires_grad_(True)
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dy)
            return out, xi.grad
        return run

    routed_flop = 2 * N * args.num_experts_per_tok * 3 * args.hidden_size * args.moe_intermediate_size
    shared_flop = 2 * N * 3 * args.hidden_size * args.moe_intermediate_size * args.n_shared_experts
    flop = 3 * (routed_flop + shared_flop)
    variants = {}
    ref_out = ref_grad = None
    for impl in ("grouped_mm", "eager"):
        try:
            m = hf_moe(impl)
            variants[f"transformers {impl}"] = fwd_bwd(m)
            if ref_out is None:
                ref_out, ref_grad = (t.detach().float() for t in fwd_bwd(m)())
        except Exception as e:
            row("moe", variant=f"transformers {impl}", error=f"{type(e).__name__}: {e}"[:300])
    # float64 truth: transformers' eager experts on the same (bf16-valued) weights and inputs
    ref64 = None
    try:
        m64 = hf_moe("eager").double()
        x64 = x.detach().double().requires_grad_(True)
        out64 = m64(x64)
        out64 = out64[0] if isinstance(out64, tuple) else out64
        out64.backward(dy.double())
        ref64 = (out64.detach(), x64.grad.detach())
        del m64, x64, out64
    except Exception as e:
        row("moe", variant="float64 reference", error=f"{type(e).__name__}: {e}"[:300])
    variants["ours bf16"] = fwd_bwd(ours)
    fp8 = MoE(args).cuda().to(torch.bfloat16)
    fp8.load_state_dict(ours.state_dict())
    fp8.gate.e_score_correction_bias.data = fp8.gate.e_score_correction_bias.float()
    enable_fp8_training(fp8)
    variants["ours FP8"] = fwd_bwd(fp8.train())
    variants["ours FP8, Triton grouped GEMM"] = triton_grouped(fwd_bwd(fp8))
    anchor = None
    for name, fn in variants.items():
        try:
            out, grad = fn()
            check = check64 = "-"
            if ref_out is not None:
                e_out = float((out.float() - ref_out).norm() / ref_out.norm())
                e_grad = float((grad.float() - ref_grad).norm() / ref_grad.norm())
                check = f"out {e_out:.1e}, dx {e_grad:.1e}"
            if ref64 is not None:
                e_out = float((out.double() - ref64[0]).norm() / ref64[0].norm())
                e_grad = float((grad.double() - ref64[1]).norm() / ref64[1].norm())
                check64 = f"out {e_out:.1e}, dx {e_grad:.1e}"
            ms = bench_ms(fn)
        except Exception as e:
            row("moe", variant=name, error=f"{type(e).__name__}: {e}"[:300])
            continue
        anchor = anchor or ms
        row("moe", variant=name, ms=round(ms, 2), tflops=round(flop / ms / 1e9, 1),
            speedup=round(anchor / ms, 2), vs_transformers=check, vs_float64=check64)


def synthetic_batches(vocab, B, T, n, seed=0, device="cuda"):
    """A bigram language: each token has 4 likely successors (entropy ~ln 4 at best)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        ids = torch.empty(B, T, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (B,), generator=g)
        choice = torch.randint(0, 4, (B, T), generator=g)
        for t in range(1, T):
            ids[:, t] = succ[ids[:, t - 1], choice[:, t]]
        out.append(ids.to(device))
    return out


def build_ours(args, fp8: bool, seed=0):
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    m = m.cuda().to(torch.bfloat16)
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.gate.e_score_correction_bias.data = mod.gate.e_score_correction_bias.float()
    if fp8:
        enable_fp8_training(m)
    return m.train()


def step_section(quick):
    cfg = hf_config(quick)
    args = our_args(cfg)
    B, T = (2, 512) if quick else (4, 2048)
    ids = synthetic_batches(args.vocab_size, B, T, 1)[0]
    fpt = training_flops_per_token(args, T)
    results = {}

    def timed(name, model, call):
        def run():
            model.zero_grad(set_to_none=True)  # as an optimizer step leaves them
            loss = call(model)
            loss.backward()
            return loss
        try:
            loss = run()
            model.zero_grad(set_to_none=True)
            ms = bench_ms(run, 300, 2000)
            model.zero_grad(set_to_none=True)
        except Exception as e:
            row("step", variant=name, error=f"{type(e).__name__}: {e}"[:300])
            return
        tok_s = B * T / ms * 1e3
        results[name] = ms
        anchor = next(iter(results.values()))
        row("step", variant=name, ms=round(ms, 1), tokens_s=round(tok_s), mfu=f"{tok_s * fpt / PEAK_BF16:.1%}",
            speedup=round(anchor / ms, 2), loss=round(float(loss), 4),
            peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))
        torch.cuda.reset_peak_memory_stats()

    try:
        from transformers import DeepseekV3ForCausalLM
        hf = DeepseekV3ForCausalLM(set_experts_impl(hf_config(quick), "grouped_mm")).cuda().to(torch.bfloat16).train()
        timed("transformers grouped_mm", hf, lambda m: m(input_ids=ids, labels=ids).loss)
        del hf
        torch.cuda.empty_cache()
    except Exception as e:
        row("step", variant="transformers grouped_mm", error=f"{type(e).__name__}: {e}"[:300])
    labels = ids.roll(-1, 1)
    for fp8 in (False, True):
        m = build_ours(args, fp8)
        timed(f"ours {'FP8' if fp8 else 'bf16'}", m, lambda m: m.compute(ids, labels=labels, with_mtp=False).loss)
        if fp8:
            timed("ours FP8, Triton grouped GEMM", m,
                  triton_grouped(lambda m: m.compute(ids, labels=labels, with_mtp=False).loss))
        del m
        torch.cuda.empty_cache()
    row("step", note=f"FLOPs/token {fpt:.3e}, activated params {count_parameters(args).active / 1e9:.2f}B, "
                     f"total {count_parameters(args).total / 1e9:.2f}B")


def loss_section(quick, steps):
    cfg = hf_config(quick)
    args = our_args(cfg)
    B, T = (2, 512) if quick else (4, 2048)
    t0 = time.time()
    batches = synthetic_batches(args.vocab_size, B, T, steps, seed=1)
    print(f"  {steps} batches built in {time.time() - t0:.0f}s", flush=True)
    curves = {}
    for fp8 in (False, True):
        m = build_ours(args, fp8, seed=3)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
        losses = []
        t0 = time.time()
        for i, ids in enumerate(batches):
            lr_scale = min(1.0, (i + 1) / 20)
            for grp in opt.param_groups:
                grp["lr"] = 3e-4 * lr_scale
            loss = m.compute(ids, labels=ids.roll(-1, 1), with_mtp=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if i % 25 == 0:
                print(f"  {'FP8' if fp8 else 'bf16'} step {i}: loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
        curves["fp8" if fp8 else "bf16"] = losses
        row("loss", variant="FP8" if fp8 else "bf16", steps=steps, first=round(losses[0], 4),
            last20_mean=round(sum(losses[-20:]) / 20, 4), wall_s=round(time.time() - t0, 1))
        del m, opt
        torch.cuda.empty_cache()
    a, b = (sum(curves[k][-20:]) / 20 for k in ("bf16", "fp8"))
    per_step = [abs(x - y) / y for x, y in zip(curves["fp8"], curves["bf16"])]
    row("loss", variant="FP8 vs bf16", rel_gap_last20=f"{(b - a) / a:.3%}",
        max_rel_gap_after_step_50=f"{max(per_step[50:]) if len(per_step) > 50 else float('nan'):.3%}")
    return curves


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="moe,step,loss")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import transformers
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__, flush=True)
    s = a.sections.split(",")
    curves = None
    if "moe" in s:
        moe_section(a.quick)
        # the section's models and the float64 reference leave cached blocks of many sizes;
        # hand them back so the step timings start from the state a training job would have
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    if "step" in s:
        step_section(a.quick)
    if "loss" in s:
        curves = loss_section(a.quick, a.steps)
    print_tables(ROWS, ("moe", "step", "loss"))
    if grouped.WGMMA_DISABLED_BECAUSE:
        print("the Gluon grouped FP8 kernel was given up:", grouped.WGMMA_DISABLED_BECAUSE)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": ROWS, "curves": curves}, f)


if __name__ == "__main__":
    main()
