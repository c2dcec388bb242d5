"""The bias update sums expert loads over data-parallel ranks (gloo, 2 CPU processes)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import small_args
from posttrain.model import update_router_bias
from posttrain.model.moe import MoE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        moe = MoE(small_args(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2))
        # rank 0 saw only experts 0-3, rank 1 only experts 4-7: each rank alone looks skewed,
        # together the load is flat except expert 0, which got the most
        load = torch.zeros(8)
        if rank == 0:
            load[:4] = torch.tensor([10.0, 4.0, 4.0, 4.0])
        else:
            load[4:] = 4.0
        moe.tokens_per_expert.copy_(load)
        update_router_bias(moe, gamma=0.5)
        out[rank] = moe.gate.e_score_correction_bias.clone()
    finally:
        dist.destroy_process_group()


def test_bias_update_uses_loads_summed_over_ranks():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    total = torch.tensor([10.0, 4, 4, 4, 4, 4, 4, 4])
    expected = 0.5 * torch.sign(total.mean() - total)
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)
    # a rank that updated from its own loads would have lowered experts 1-3 (rank 0) or 4-7 (rank 1)
    assert expected[1:].gt(0).all() and expected[0] < 0
