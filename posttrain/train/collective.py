"""The few collectives the stages need, as no-ops in a single process."""

from __future__ import annotations

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over every process (float64)."""
    return _all_reduce(values, torch.distributed.ReduceOp.SUM)


def all_max(values: list[float]) -> list[float]:
    return _all_reduce(values, torch.distributed.ReduceOp.MAX)


def _all_reduce(values: list[float], op) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def all_gather(obj) -> list:
    """Every process's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
