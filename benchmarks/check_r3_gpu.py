"""Routing replay and chunked log-probs on one GPU: correctness first, then cost.

    python benchmarks/check_r3_gpu.py [--out DIR]

1. R3 on the GPU paths: a V3-shaped MoE (bf16, fused routing kernel; then FP8 training GEMMs)
   whose routers sit near ties. The torch engine samples on the GPU (absorbed decode path) and
   reports each token's experts; the trainer's log-probs of those samples (naive path, bf16 and
   FP8) are compared with the engine's, without and with replay. Replaying the model's own
   routing must leave log-probs and gradients as they were (the replay path against the fused
   kernel's); replaying other experts must route the gradient into the router.
2. Log-probs of chosen tokens at a 163,840-word vocabulary, 128 sequences x 1,024 tokens:
   chunked (Transformer.token_logprobs's path, backward recomputes each chunk) against a
   float64 reference on a slice, then peak memory and time of forward + backward, against the
   full float32 log-softmax the GRPO stage used before (expected not to fit).
Prints tables and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from posttrain.model import ModelArgs, Transformer  # noqa: E402
from posttrain.model.fp8_training import enable_fp8_training  # noqa: E402
from posttrain.model.generate import SamplingParams, generate  # noqa: E402
from posttrain.model.moe import MoE, use_fused_route  # noqa: E402
from posttrain.model.routing_replay import RoutingRecorder, RoutingReplay  # noqa: E402
from posttrain.model.token_logprobs import chosen_token_logprobs  # noqa: E402
from tables import print_tables  # noqa: E402


def _args() -> ModelArgs:
    return ModelArgs(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                     num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=512,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                     num_nextn_predict_layers=0, max_position_embeddings=4096).validate()


def _near_ties(model: Transformer, eps: float) -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                w = m.gate.weight
                w.copy_(w[0:1] + eps * torch.randn(w.shape, generator=g).to(w))


def _batch(prompts, gens, L, K, device):
    T = max(len(p) + len(g.token_ids) for p, g in zip(prompts, gens))
    B = len(prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    comp = torch.zeros(B, T - 1, dtype=torch.bool)
    engine = torch.zeros(B, T - 1)
    routed = torch.full((B, T, L, K), -1, dtype=torch.int16)
    for i, (p, g) in enumerate(zip(prompts, gens)):
        n = len(p) + len(g.token_ids)
        ids[i, :n] = torch.tensor(p + g.token_ids)
        attn[i, :n] = 1
        comp[i, len(p) - 1:n - 1] = True
        engine[i, len(p) - 1:n - 1] = torch.tensor(g.logprobs)
        routed[i, :n - 1] = torch.from_numpy(g.routed_experts.astype("int16"))
    return [t.to(device) for t in (ids, attn, comp, engine, routed)]


def r3_section() -> list[dict]:
    dev = "cuda"
    args = _args()
    torch.manual_seed(0)
    model = Transformer(args).to(dev, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.03)
    _near_ties(model, 1e-3)
    L, K = len([b for b in model.layers if isinstance(b.mlp, MoE)]), args.num_experts_per_tok
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, args.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 60, (32,), generator=g)]
    gens = generate(model, prompts, SamplingParams(max_new_tokens=96, temperature=1.0, logprobs=True),
                    seeds=list(range(32)), record_routing=True)
    ids, attn, comp, engine, routed = _batch(prompts, gens, L, K, dev)
    rows = []
    replay = RoutingReplay(model)
    assert use_fused_route(torch.zeros(1, args.n_routed_experts, device=dev), args), "fused route not in use"
    for label, fp8 in (("bf16", False), ("fp8", True)):
        if fp8:
            enable_fp8_training(model)
        model.train()
        out = {}
        for mode in ("own", "replay"):
            model.zero_grad(set_to_none=True)
            if mode == "replay":
                replay.set(routed)
            else:
                replay.clear()
            rec = RoutingRecorder(model)
            logp, _ = model.token_logprobs(ids, attn, comp)
            taken = rec.take()[0].view(*ids.shape, L, K)
            rec.remove()
            (logp.sum()).backward()
            gate_grad = sum(float(b.mlp.gate.weight.grad.float().norm()) for b in model.layers if isinstance(b.mlp, MoE))
            out[mode] = (logp.detach(), taken, gate_grad)
        m = comp
        known = (routed >= 0).all(-1)
        agree = (out["own"][1].sort(-1).values == routed.long().sort(-1).values).all(-1)[known].float().mean()
        # replaying the trainer's own routing: the replay path against the fused kernel's
        model.zero_grad(set_to_none=True)
        replay.set(out["own"][1])
        logp_self, _ = model.token_logprobs(ids, attn, comp)
        logp_self.sum().backward()
        replay.clear()
        rows.append({"trainer": label, "tokens": int(m.sum()), "routing agreement engine/trainer": round(float(agree), 4),
                     "gap max, no replay": float((out["own"][0] - engine).abs()[m].max()),
                     "gap max, replay": float((out["replay"][0] - engine).abs()[m].max()),
                     "gap mean, no replay": float((out["own"][0] - engine).abs()[m].mean()),
                     "gap mean, replay": float((out["replay"][0] - engine).abs()[m].mean()),
                     "own routing replayed: max |dlogp|": float((logp_self.detach() - out["own"][0]).abs()[m].max()),
                     "router grad norm (replay)": out["replay"][2]})
    return rows


def replay_precision_section() -> list[dict]:
    """Replaying the model's own routing, per dtype: against the same forward run twice (the
    floor) and against the fused-route forward. The replayed routing has no precomputed slot
    histogram, so the dispatch takes its other path; a difference at the dtype's rounding
    level is that, a larger one would be a replay error."""
    dev = "cuda"
    args = _args()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, args.vocab_size, (16, 256), generator=g).to(dev)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Transformer(args).to(dev, dtype).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.03)
        _near_ties(model, 1e-3)
        replay = RoutingReplay(model)
        with torch.no_grad():
            rec = RoutingRecorder(model)
            a, _ = model.token_logprobs(ids)
            own = rec.take()[0].view(*ids.shape, -1, args.num_experts_per_tok)
            b, _ = model.token_logprobs(ids)
            rec.remove()
            replay.set(own)
            c, _ = model.token_logprobs(ids)
            replay.clear()
        rows.append({"dtype": str(dtype).replace("torch.", ""), "fused route": use_fused_route(
                         torch.zeros(1, args.n_routed_experts, device=dev, dtype=dtype), args),
                     "same forward twice: max |dlogp|": float((a - b).abs().max()),
                     "own routing replayed: max |dlogp|": float((a - c).abs().max()),
                     "own routing replayed: mean |dlogp|": float((a - c).abs().mean())})
    return rows


def logprob_section() -> list[dict]:
    dev = "cuda"
    V, D, B, T = 163840, 1024, 128, 1024
    head = torch.nn.Linear(D, V, bias=False, device=dev, dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.02)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(B * T, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (B * T,), device=dev, generator=g)
    # correctness on a slice, float64 reference
    s = slice(0, 2048)
    got, ent = chosen_token_logprobs(head, h[s], y[s], V, temperature=0.7, with_entropy=True)
    with torch.no_grad():
        z = head(h[s]).double() / 0.7
    ref = z.log_softmax(-1).gather(-1, y[s, None]).squeeze(-1)
    ref_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    err = float((got.detach().double() - ref).abs().max())
    ent_err = float((ent.detach().double() - ref_ent).abs().max())
    rows = [{"what": "chunked vs float64 (2,048 rows)", "max |dlogp|": err, "max |dentropy|": ent_err}]
    for name in ("chunked", "full fp32 log_softmax"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h.grad = None
        head.weight.grad = None
        try:
            t = time.perf_counter()
            if name == "chunked":
                lp, _ = chosen_token_logprobs(head, h, y, V, temperature=0.7, with_entropy=True)
            else:
                logits = head(h).float() / 0.7
                logsm = torch.log_softmax(logits, -1)
                lp = logsm.gather(-1, y[:, None]).squeeze(-1)
                _ = -(logsm.exp() * logsm).sum(-1)
            lp.sum().backward()
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            rows.append({"what": f"{name}, 131,072 tokens x 163,840 vocab, fwd+bwd", "seconds": round(secs, 3),
                         "peak GiB above inputs": round(peak, 1)})
        except torch.OutOfMemoryError:
            rows.append({"what": f"{name}, 131,072 tokens x 163,840 vocab, fwd+bwd", "seconds": "out of memory",
                         "peak GiB above inputs": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)})
        finally:
            lp = logits = logsm = None  # noqa: F841
            torch.cuda.empty_cache()
    return rows


def _table(name: str, rows: list[dict]) -> None:
    """Floats to three significant figures for reading; results.json keeps them whole."""
    print_tables([{"section": name, **{k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in r.items()}}
                  for r in rows], (name,))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sections", default="r3,replay_precision,logprobs")
    a = p.parse_args()
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    results = {}
    sections = {"r3": r3_section, "replay_precision": replay_precision_section, "logprobs": logprob_section}
    for name in a.sections.split(","):
        section = sections[name]
        try:  # one section failing still reports the other
            results[name] = section()
            _table(name, results[name])
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results[name] = f"failed: {type(e).__name__}: {e}"
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), **results}, f, indent=1)
    if any(isinstance(v, str) for v in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
