"""Expert parallelism on 2 GPUs (NCCL): equivalence in bf16, then throughput against one GPU.

    torchrun --nproc_per_node 2 benchmarks/bench_expert_parallel.py [--quick] [--layers 4]

check  a small model (8 experts, one never chosen, skewed routing) in bf16: rank 0 runs the
       whole batch alone (EP=1, no FSDP); then both ranks run EP=2 + FSDP2 on half the
       batch each. Logits, loss and every whole gradient (gathered) are compared with the
       single-GPU run (relative Frobenius error; bf16 tolerance 2e-2).
speed  a MoE-heavy V3 shape (hidden 2048, --layers layers with the first dense, 64 experts
       top-6 + 2 shared of width 1408, kv_lora 512, 16 heads, vocab 32000), bf16 weights,
       forward + backward + AdamW step on B x T tokens per GPU. One GPU holds the whole model
       (rank 0 alone, plain module); EP=2 + FSDP2 splits the experts over both GPUs, each
       with its own B x T tokens. Reported: tokens/s in total and per GPU, the EP=2 / one-GPU
       ratio (the goal is >= 1.7x), peak memory per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tables import print_tables  # noqa: E402

from posttrain.model import ModelArgs, Transformer  # noqa: E402
from posttrain.model.moe import MoE  # noqa: E402
from posttrain.model.parallel import build_meshes, full_state_dict, parallelize  # noqa: E402

ROWS: list[dict] = []
DEV = "cuda"  # --cpu: gloo on CPU, a smoke test of this script (timings meaningless)


def row(section, **kv):
    kv["section"] = section
    ROWS.append(kv)
    if dist.get_rank() == 0:
        print(json.dumps(kv), flush=True)


def v3_args(quick: bool, layers: int) -> ModelArgs:
    d = dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
             num_hidden_layers=layers, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
             num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
             rope_scaling=None, num_nextn_predict_layers=0)
    if quick:
        d.update(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_attention_heads=4,
                 vocab_size=4096, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    return ModelArgs(**d).validate()


def check_args() -> ModelArgs:
    return ModelArgs(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                     num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
                     qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                     num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=None).validate()


def build(args: ModelArgs, seed: int, dtype=torch.bfloat16, skew: bool = False) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
        if skew:
            for mod in m.modules():
                if isinstance(mod, MoE):
                    mod.gate.e_score_correction_bias[:2] += 0.5
                    mod.gate.e_score_correction_bias[6] = -1e4
    m = m.to(dtype)
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.gate.e_score_correction_bias.data = mod.gate.e_score_correction_bias.float()
    return m.to(DEV).train()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def check_section():
    rank, world = dist.get_rank(), dist.get_world_size()
    args = check_args()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (4, 256), generator=g).to(DEV)
    ref = None
    if rank == 0:
        m = build(args, seed=0, skew=True)
        out = m.compute(ids, labels=ids)
        out.loss.backward()
        ref = {"logits": out.logits.detach(), "loss": float(out.loss),
               "grads": {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}}
        del m
    dist.barrier()
    m = build(args, seed=0, skew=True)
    parallelize(m, build_meshes(ep=world, device_type=DEV))
    rows = ids.shape[0] // world
    mine = ids[rank * rows:(rank + 1) * rows]
    out = m.compute(mine, labels=mine)
    out.loss.backward()
    grads = full_state_dict(m, grads=True)
    logits = [torch.empty_like(out.logits) for _ in range(world)]
    dist.all_gather(logits, out.logits.detach().contiguous())
    loss = torch.tensor([float(out.loss)], device=DEV)
    dist.all_reduce(loss)
    if rank == 0:
        worst_name, worst = "", 0.0
        for n, gref in ref["grads"].items():
            e = rel(grads[n].to(DEV), gref)
            if e > worst:
                worst_name, worst = n, e
        e_logits = rel(torch.cat(logits), ref["logits"])
        e_loss = abs(float(loss) / world - ref["loss"]) / ref["loss"]
        ok = e_logits < 2e-2 and e_loss < 2e-2 and worst < 2e-2
        row("check", ep=world, logits_rel_err=f"{e_logits:.2e}", loss_rel_err=f"{e_loss:.2e}",
            worst_grad_rel_err=f"{worst:.2e}", worst_grad=worst_name, params=len(ref["grads"]),
            within_bf16_tol=ok)
    del m
    empty_cache()


def timed_steps(model, ids, steps: int, warmup: int, collective: bool = True) -> float:
    """Seconds per training step. collective=False for a run on one rank alone (no barrier)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEV == "cuda")
    labels = ids.roll(-1, 1)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            if collective:
                dist.barrier()
            t0 = time.perf_counter()
        loss = model.compute(ids, labels=labels, with_mtp=False, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / steps


def speed_section(quick: bool, layers: int, B: int, T: int, steps: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    args = v3_args(quick, layers)
    g = torch.Generator().manual_seed(2 + rank)
    ids = torch.randint(0, args.vocab_size, (B, T), generator=g).to(DEV)
    one_gpu = None
    if rank == 0:
        m = build(args, seed=0)
        reset_peak()
        one_gpu = timed_steps(m, ids, steps, warmup=3, collective=False)
        row("speed", layout="1 GPU, whole model", tokens_s=round(B * T / one_gpu),
            tokens_s_per_gpu=round(B * T / one_gpu), step_ms=round(one_gpu * 1e3, 1), speedup=1.0,
            peak_gb=round(peak_gb(), 1))
        del m
        empty_cache()
    dist.barrier()
    m = build(args, seed=0)
    parallelize(m, build_meshes(ep=world, device_type=DEV))
    reset_peak()
    t = timed_steps(m, ids, steps, warmup=3)
    peak = torch.tensor([peak_gb()], device=DEV)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        row("speed", layout=f"EP={world} + FSDP2, {world} GPUs", tokens_s=round(world * B * T / t),
            tokens_s_per_gpu=round(B * T / t), step_ms=round(t * 1e3, 1),
            speedup=round((world * B * T / t) / (B * T / one_gpu), 2), peak_gb=round(float(peak), 1))
        row("speed", note=f"{layers} layers, total params {sum(p.numel() for p in build_meta(args).parameters()) / 1e9:.2f}B, "
                          f"{B}x{T} tokens per GPU, {steps} timed steps (after 3 warm-up)")


def build_meta(args):
    with torch.device("meta"):
        return Transformer(args)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="check,speed")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU: checks that the script runs")
    a = p.parse_args()
    global DEV
    if a.cpu:
        DEV = "cpu"
        dist.init_process_group("gloo")
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU"
        print(name, "x", dist.get_world_size(), "torch", torch.__version__, flush=True)
    try:
        if "check" in a.sections:
            check_section()
        if "speed" in a.sections:
            speed_section(a.quick, a.layers, a.batch, a.seq, a.steps)
    finally:
        if dist.get_rank() == 0:
            print_tables(ROWS, ("check", "speed"))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
