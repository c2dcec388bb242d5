"""Expert parallelism + FSDP2 on 2 CPU processes (gloo) against one process, fp32.

One batch of 4 rows split evenly over the ranks; under EP=2 each rank holds 4 of the 8 routed
experts (with 4 ranks, FSDP also shards them over the 2 ranks that hold the same 4). Routing is skewed by the selection bias (most rows go to rank 0's experts) and one
expert can never be chosen, so it receives no tokens. What must hold, at <= 1e-5 relative:
* forward: each rank's logits equal the single process's logits of its rows; the mean of the
  ranks' losses equals the single-process loss (equal token counts per rank);
* gradients: every parameter's whole gradient, gathered from FSDP shards and EP ranges,
  equals the single-process gradient (this checks the expert gradient divide factor);
* expert loads summed over ranks equal the single process's;
* checkpoints: the HF checkpoint the EP=2 ranks load was written by one process (EP=1 -> 2),
  and after one AdamW step the EP=2 run writes one that a single process loads with the
  same logits as the EP=2 model's (EP=2 -> 1).
Activation checkpointing is on in the EP run: its gradients and loads must not change.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import randomize_, small_args
from posttrain.model import Transformer, load_checkpoint, save_checkpoint

B, T, SEED = 4, 12, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args():
    return small_args(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2,
                      num_hidden_layers=3, first_k_dense_replace=1)


def _model() -> Transformer:
    model = randomize_(Transformer(_args()), seed=SEED).float()
    with torch.no_grad():
        for layer in model.layers[1:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias[:2] += 0.6      # skew: experts 0 and 1 (rank 0's range) win most rows
            bias[6] = -1e4       # expert 6 (rank 1's range) never wins: it receives no tokens
    return model


def _batch():
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, _args().vocab_size, (B, T), generator=g)


def _loads(model) -> torch.Tensor:
    return torch.stack([layer.mlp.tokens_per_expert.clone() for layer in model.layers[1:]])


def _worker(rank: int, world: int, ep: int, port: int, ckpt_in: str, ckpt_out: str, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective mismatch hangs; print where each rank waits instead of running into pytest's timeout
    faulthandler.dump_traceback_later(180, exit=True, file=sys.stderr)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from posttrain.model.parallel import build_meshes, full_state_dict, parallelize

        model = load_checkpoint(ckpt_in, dtype=torch.float32)[0].train()
        parallelize(model, build_meshes(ep=ep, device_type="cpu"), activation_checkpointing=True)
        # E/ep experts here, FSDP-sharded over the world/ep ranks that hold the same ones
        assert model.layers[1].mlp.experts.gate_up_proj.to_local().shape[0] == 8 // ep // (world // ep)
        rows = B // world
        ids = _batch()[rows * rank: rows * (rank + 1)]
        res = model.compute(ids, labels=ids)
        res.loss.backward()
        grads = full_state_dict(model, grads=True)
        loads = _loads(model)
        dist.all_reduce(loads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt.step()
        with torch.no_grad():
            after = model.compute(ids).logits
        full = full_state_dict(model)
        if rank == 0:
            save_checkpoint(model, model.args, ckpt_out, state_dict=full)
        dist.barrier()
        out[rank] = {"logits": res.logits.detach(), "loss": float(res.loss), "grads": grads,
                     "loads": loads, "after": after}
    finally:
        dist.destroy_process_group()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_ep_equals_one_process_and_checkpoints_cross_layouts(tmp_path, world, ep):
    model = _model().train()
    save_checkpoint(model, model.args, tmp_path / "ep1", dtype=torch.float32)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, ep, _free_port(), str(tmp_path / "ep1"), str(tmp_path / "ep2"), out),
             nprocs=world, join=True)

    ref_model = load_checkpoint(tmp_path / "ep1", dtype=torch.float32)[0].train()
    ids = _batch()
    ref = ref_model.compute(ids, labels=ids)
    ref.loss.backward()
    ref_loads = _loads(ref_model)

    # the routing really is skewed, and expert 6 got nothing
    assert ref_loads[:, 6].eq(0).all() and ref_loads[:, :4].sum() > 2 * ref_loads[:, 4:].sum()
    assert torch.equal(out[0]["loads"], ref_loads)
    logits = torch.cat([out[r]["logits"] for r in range(world)])
    assert rel(logits, ref.logits) < 1e-5
    assert abs(sum(out[r]["loss"] for r in range(world)) / world - float(ref.loss)) < 1e-5 * float(ref.loss)
    grads = out[0]["grads"]
    for name, p in ref_model.named_parameters():
        if p.grad is None:
            continue
        assert name in grads, name
        assert rel(grads[name], p.grad) < 1e-5, name
        assert all(torch.equal(grads[name], out[r]["grads"][name]) for r in range(world)), name
    assert grads["layers.1.mlp.experts.gate_up_proj"][6].abs().max() == 0  # the expert without tokens

    # EP=2 -> EP=1: the checkpoint written after the step reproduces the EP=2 model's logits
    loaded = load_checkpoint(tmp_path / "ep2", dtype=torch.float32)[0].eval()
    with torch.no_grad():
        got = loaded.compute(ids).logits
    after = torch.cat([out[r]["after"] for r in range(world)])
    assert rel(after, ref.logits) > 1e-3  # the step changed the weights
    assert rel(got, after) < 1e-5
