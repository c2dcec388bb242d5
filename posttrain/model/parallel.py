"""Expert parallelism (EP) with FSDP2, as DeepSeek-V3 trains: experts spread over ranks, no
tensor parallelism.

Layout over a world of W ranks with expert-parallel size `ep` (W divisible by ep):

    dense mesh   ("dp",)          W ranks: attention, dense MLPs, shared experts, router,
                                  embedding and head are FSDP2-sharded over every rank
    expert mesh  ("edp", "ep")    W/ep x ep; rank r sits at (r // ep, r % ep), so an EP group
                                  is ep consecutive ranks (one node's NVLink for ep <= 8)

Each EP rank owns a contiguous range of E/ep routed experts; those weights are FSDP2-sharded
over the expert data-parallel group ("edp": the ranks that own the same range).

Token flow in an EP MoE layer (see `expert_parallel_experts`):
1. rows sorted by (global) expert, counts per expert [E];
2. all-to-all of the counts: each rank learns how many rows every peer sends to each of its
   local experts (one host sync: the row splits must be Python ints);
3. all-to-all of the rows (dispatch), regroup them by local expert, grouped GEMM;
4. the reverse all-to-all (combine); the caller applies the gate weights in fp32 and sums
   the top-k copies, exactly as without EP.

Gradients: every rank's loss is its own tokens' mean, so the global loss is their average
over W ranks. FSDP2 averages dense gradients over W. A local expert's gradient already sums
the contributions of every EP peer's tokens (they came through the all-to-all), so it must be
divided by W as well, not by the W/ep of its edp group: the experts scale their weight
gradients by 1/ep (`GroupedExperts.grad_scale`) before FSDP averages over edp.
Expert loads for the aux-loss-free bias update are summed over all W ranks (each sees
distinct tokens): `update_router_bias` all-reduces over the default group.

Checkpoints stay in the HF layout whatever the parallel layout: `full_state_dict` gathers
FSDP shards and EP ranges into whole tensors (a run saved with EP=2 loads with EP=1 and the
other way round); `parallelize` slices a whole model's experts after loading.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Meshes:
    """The device meshes of one run (see the module docstring)."""

    dense: object          # DeviceMesh ("dp",), all ranks
    experts: object        # DeviceMesh ("edp", "ep")
    ep: int

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.experts.get_group("ep")

    @property
    def edp_mesh(self):
        return self.experts["edp"]


def build_meshes(ep: int = 1, device_type: str | None = None) -> Meshes:
    """Meshes over the initialised default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism / FSDP need torch.distributed initialised "
                           "(launch with torchrun or accelerate launch)")
    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ValueError(f"expert_parallel={ep} must divide the number of processes ({world})")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    dense = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    experts = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return Meshes(dense, experts, ep)


# ------------------------------------------------------------------------- dispatch / combine


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        back = g.new_empty(sum(in_splits), *g.shape[1:])
        dist.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """counts_E: rows this rank sends to each global expert. Returns recv [ep, E/ep]: rows each
    peer sends to each of this rank's local experts."""
    ep = dist.get_world_size(group)
    send = counts_E.to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(ep, send.numel() // ep)


def expert_parallel_experts(x_MD: torch.Tensor, counts_E: torch.Tensor, run_local, group) -> torch.Tensor:
    """Rows sorted by global expert -> this rank's experts on every peer's rows -> back.

    run_local(x_rows, local_counts) runs the local experts on rows grouped by local expert.
    Returns the outputs in x_MD's row order.
    """
    ep = dist.get_world_size(group)
    E = counts_E.numel()
    recv_PL = exchange_counts(counts_E, group)                      # [ep peers, local experts]
    send_splits = counts_E.view(ep, E // ep).sum(1).tolist()        # one host sync for both
    recv_splits = recv_PL.sum(1).tolist()
    x_recv = all_to_all(x_MD, recv_splits, send_splits, group)      # rows by (peer, local expert)
    local = torch.arange(E // ep, device=x_MD.device).repeat(ep)
    expert_of_row = torch.repeat_interleave(local, recv_PL.flatten().to(x_MD.device))
    order = torch.argsort(expert_of_row, stable=True)               # a permutation: deterministic
    y_local = run_local(x_recv[order], recv_PL.sum(0).to(x_MD.device))
    unorder = torch.empty_like(order)
    unorder[order] = torch.arange(order.numel(), device=order.device)
    return all_to_all(y_local[unorder], send_splits, recv_splits, group)


# ------------------------------------------------------------------------------ applying it


def shard_experts(model: nn.Module, ep_group) -> int:
    """Keep only this EP rank's contiguous range of routed experts in every MoE layer; returns
    how many layers were sharded. Weights must be whole (a freshly loaded model)."""
    from .moe import MoE

    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    n = 0
    for moe in model.modules():
        if not isinstance(moe, MoE):
            continue
        experts = moe.experts
        E = experts.gate_up_proj.shape[0]
        if E % ep:
            raise ValueError(f"{E} routed experts cannot be split evenly over expert_parallel={ep}")
        lo, hi = rank * (E // ep), (rank + 1) * (E // ep)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        experts.n_experts = hi - lo
        moe.ep_group, moe.ep_size, moe.expert_offset = ep_group, ep, lo
        n += 1
    return n


def parallelize(model: nn.Module, meshes: Meshes, mixed_precision: str = "no",
                activation_checkpointing: bool = False) -> nn.Module:
    """EP (when meshes.ep > 1) and FSDP2 on a whole model, in place. Call before building the
    optimizer; the parameters become DTensors. mixed_precision "bf16": bf16 compute and
    all-gathers, fp32 gradient reduction, fp32 master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from .moe import MoE

    if meshes.ep > 1:
        shard_experts(model, meshes.ep_group)
    mp = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision not in ("no", None):
        raise ValueError(f"mixed_precision={mixed_precision!r} under FSDP: use 'no' or 'bf16'")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("parallelize expects the core Transformer (with .layers)")
    # MTP modules are blocks too (with their own routed experts): shard them the same way
    for block in [*layers, *getattr(model, "mtp", [])]:
        block.activation_checkpointing = activation_checkpointing
        if isinstance(block.mlp, MoE):
            # FSDP averages expert gradients over edp (W/ep ranks); the experts scale theirs
            # by 1/ep first, so the total divisor is W like the dense weights'. (FSDP's own
            # set_gradient_divide_factor needs PREMUL_SUM, which gloo lacks.)
            block.mlp.experts.grad_scale = 1.0 / meshes.ep
            fully_shard(block.mlp.experts, mesh=meshes.edp_mesh, mp_policy=mp)
        shared_head = getattr(block, "shared_head", None)
        if shared_head is not None:
            # an MTP module's head norm is called from outside the module's forward (by the
            # Transformer's MTP loss): as its own unit it is gathered when it runs
            fully_shard(shared_head.norm, mesh=meshes.dense, mp_policy=mp)
        fully_shard(block, mesh=meshes.dense, mp_policy=mp)
    fully_shard(model, mesh=meshes.dense, mp_policy=mp)
    # The stages call these entry points rather than forward(); FSDP must gather the root's
    # parameters (embedding, head, norm) around them too.
    for method in ("compute", "score_tokens", "token_logprobs"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    model.parallel_meshes = meshes
    return model


def _is_ep_expert(model: nn.Module, name: str) -> bool:
    from .moe import MoE

    parent = name.rsplit(".", 2)[0]  # "layers.3.mlp.experts.gate_up_proj" -> "layers.3.mlp"
    try:
        moe = model.get_submodule(parent)
    except AttributeError:
        return False
    return isinstance(moe, MoE) and name.startswith(parent + ".experts.") and moe.ep_size > 1


class GatheredStateDict(Mapping):
    """A sharded model's state dict as whole tensors, gathered one tensor at a time.

    Iterating (`items()`) or indexing runs collectives (FSDP all-gathers, the EP all-gather of
    expert ranges), so every rank must walk it in the same order. Only the tensor in hand is
    materialised: a consumer that streams (`hf_state_dict` -> GRPO's weight-sync buckets, a
    rollout copy's `copy_`) never holds more than it asks for. grads=True gives the
    parameters' gradients instead (parameters without one are left out); buffers otherwise
    come along. Tensors are returned on CPU when `to_cpu` (the default)."""

    def __init__(self, model: nn.Module, grads: bool = False, to_cpu: bool = True):
        self.model, self.grads, self.to_cpu = model, grads, to_cpu
        self._params = dict(model.named_parameters())
        source = self._params if grads else model.state_dict()
        self._source = {k: v for k, v in source.items() if not grads or v.grad is not None}

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __getitem__(self, name: str) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        t = self._source[name]
        t = (t.grad if self.grads else t).detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if name in self._params and _is_ep_expert(self.model, name):
            group = self.model.get_submodule(name.rsplit(".", 2)[0]).ep_group
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, 0)
        return t.cpu() if self.to_cpu else t


def is_sharded(model: nn.Module) -> bool:
    """Whether `parallelize` has been applied (its weights are then DTensors / EP ranges)."""
    return getattr(model, "parallel_meshes", None) is not None


def full_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Whole tensors (parameters, or their gradients with grads=True, plus buffers) on every
    rank: FSDP shards gathered, EP expert ranges concatenated in expert order. Collective:
    every rank must call it. Tensors are on CPU; for a large model, stream
    `GatheredStateDict` instead."""
    return dict(GatheredStateDict(model, grads=grads).items())


def clip_grad_norm_(model: nn.Module, max_norm: float | None) -> float:
    """Global gradient norm over all ranks, clipping when max_norm is set.

    Under FSDP2 + EP every rank holds a distinct piece of every gradient (dense shards over W
    ranks; expert shards over edp, distinct expert ranges over ep), so the squared norm is the
    sum over ranks of the local pieces' squared norms."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    dev = local[0].device if local else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in local:
        sq += g.detach().float().pow(2).sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm and norm > max_norm and torch.isfinite(sq):
        scale = max_norm / (norm + 1e-6)
        for g in local:
            g.mul_(scale)
    return norm
