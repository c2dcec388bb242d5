"""DeepSeekMoE: the V3 router, stacked routed experts, shared experts, and load balancing.

Router (per token, float32):
    s = sigmoid(x W_gate^T)                     affinities, [N, E]
    b = e_score_correction_bias                 used for *selection only*
    group score = sum of the top-2 of (s + b) within each of n_group groups
    keep the topk_group best groups, then the top-k experts of (s + b) inside them
    gate weights = s at those experts (unbiased), normalised to sum 1, * routed_scaling_factor

Load balancing, both from the report:
    * auxiliary-loss-free: after each optimizer step, b_e += gamma * sign(mean load - load_e)
      (`update_router_bias`); the bias never receives a gradient;
    * the complementary sequence-wise balance loss alpha * sum_e f_e P_e per sequence
      (`MoE.balance_loss`, computed in training when alpha > 0).

Routed experts are stored stacked as transformers 5 keeps them, gate_up [E, 2I, D] and down
[E, D, I] (each expert's gate, up and down in nn.Linear's [out, in] layout, so per-expert
checkpoint tensors map onto slices), and run as grouped GEMMs over tokens sorted by expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .dispatch import combine_tokens, dispatch_tokens, dispatch_weighted_tokens
from . import layers
from .grouped_mm import grouped_mm
from .kernels import route as route_kernels
from .kernels.quant import HAVE_TRITON
from .kernels.route import SlotLayout, slot_layout, slot_layout_reference
from .kernels.router_gemm import mm_f32
from .kernels.swiglu import swiglu, swiglu_forward_reference, swiglu_packed
from .layers import MLP
from .recompute import recomputing


def route(
    scores_NE: torch.Tensor,
    bias_E: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k selection on biased scores; gate weights from unbiased scores.

    Returns (weights [N, K] in the scores' dtype, expert indices [N, K]).
    """
    N, E = scores_NE.shape
    biased = scores_NE + bias_E
    if n_group > 1:
        group_scores = biased.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    idx_NK = biased.topk(top_k, dim=-1).indices
    weights_NK = scores_NE.gather(1, idx_NK)
    if norm_topk_prob:
        weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
    return weights_NK * routed_scaling_factor, idx_NK


def replay_routing(r: "Routing", idx_NK: torch.Tensor, use_N: torch.Tensor, norm_topk_prob: bool,
                   routed_scaling_factor: float) -> "Routing":
    """The routing with the given experts where use_N is True (R3, rollout routing replay):
    the experts come from elsewhere (the engine that sampled the tokens), the gate weights from
    this router's own affinities at those experts, normalised and scaled as `route` does, so
    the router still learns through them. Elsewhere the router's own choice stands."""
    idx = torch.where(use_N[:, None], idx_NK.to(r.idx.dtype), r.idx)
    weights = r.scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, idx, r.scores)


class _RouterLogits(torch.autograd.Function):
    """x W^T in float32 from bf16 x and W, with the reference's float32 sums but on tensor cores.

    The reference is F.linear(x.float(), W.float()): a float32 copy of x and cuBLAS's float32
    GEMMs, forward and backward (about 0.45 ms of one MoE layer at 16,384 tokens on an H100).
    Here (kernels/router_gemm.py): the logits are a bf16 GEMM summed and written in float32 (bf16
    products are exact in float32). Backward, the float32 logits gradient d is split into bf16
    hi + lo; dx = [hi | lo] @ [W; W] sums in float32 and rounds once to x's dtype, as the
    reference's cast of its float32 dx does; dW = hi^T x + lo^T x in float32, rounded once."""

    @staticmethod
    def forward(ctx, x_ND, w_ED):
        ctx.save_for_backward(x_ND, w_ED)
        return mm_f32(x_ND, w_ED.t())

    @staticmethod
    def backward(ctx, d_NE):
        x_ND, w_ED = ctx.saved_tensors
        E = w_ED.shape[0]
        hi = d_NE.to(x_ND.dtype)
        d2_N2E = torch.cat([hi, (d_NE - hi.float()).to(x_ND.dtype)], dim=1)
        dx = torch.mm(d2_N2E, torch.cat([w_ED, w_ED], dim=0)) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw2 = mm_f32(d2_N2E.t(), x_ND)
            dw = (dw2[:E] + dw2[E:]).to(w_ED.dtype)
        return dx, dw


def router_logits(x_ND: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """Router logits [N, E] in float32, the numbers F.linear(x.float(), W.float()) gives: on
    CUDA with bf16 x and W through `_RouterLogits`, elsewhere that very call."""
    if x_ND.is_cuda and x_ND.dtype == w_ED.dtype == torch.bfloat16:
        return _RouterLogits.apply(x_ND, w_ED)
    return F.linear(x_ND.float(), w_ED.float())


class Routing(NamedTuple):
    """The router's decision for N tokens. weights [N, K] float32 (normalised, scaled), idx [N, K]
    expert ids, scores [N, E] float32 affinities. hist / valid_hist: per-block slot counts from
    the fused kernels (all tokens / tokens marked valid), None from the torch route."""

    weights: torch.Tensor
    idx: torch.Tensor
    scores: torch.Tensor
    hist: torch.Tensor | None = None
    valid_hist: torch.Tensor | None = None


class _FusedRoute(torch.autograd.Function):
    """sigmoid, group-limited top-k, gate weights and per-block slot counts in one kernel
    (kernels/route.py); backward in one more. Same numbers as `route(logits.sigmoid(), ...)`."""

    @staticmethod
    def forward(ctx, logits_NE, bias_E, valid_N, n_group, topk_group, top_k, norm, scale):
        w, idx, scores, hist, vhist = route_kernels.route_forward(
            logits_NE, bias_E, n_group, topk_group, top_k, norm, scale, valid_N)
        ctx.save_for_backward(scores, idx)
        ctx.norm, ctx.scale = norm, scale
        ctx.set_materialize_grads(False)  # no balance loss: no scores gradient to read
        ctx.mark_non_differentiable(idx, hist, *([vhist] if vhist is not None else []))
        return w, idx, scores, hist, vhist

    @staticmethod
    def backward(ctx, dw, _didx, dscores, _dhist, _dvhist):
        if dw is None and dscores is None:
            return (None,) * 8
        scores, idx = ctx.saved_tensors
        return (route_kernels.route_backward(scores, idx, dw, dscores, ctx.norm, ctx.scale),) + (None,) * 7


def use_fused_route(logits_NE: torch.Tensor, args: ModelArgs) -> bool:
    """Whether the router runs `_FusedRoute` (CUDA with Triton, and shapes it supports)."""
    return (logits_NE.is_cuda and HAVE_TRITON
            and route_kernels.fused_route_supported(args.n_routed_experts, args.n_group))


def fuse_shared_add(x_ND: torch.Tensor) -> bool:
    """Whether the combine adds the shared experts' output in its own pass (the GPU)."""
    return x_ND.is_cuda


def weights_before_down(x_ND: torch.Tensor) -> bool:
    """Whether the gate weights scale the experts' SwiGLU outputs (before the down projection)
    rather than their outputs in the combine: on the GPU, without expert parallelism."""
    return x_ND.is_cuda


class Router(nn.Module):
    """The gate: affinity weights [E, D] and the selection bias [E] (a float32 buffer)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> Routing:
        """The routing of x. On CUDA it runs fused (`_FusedRoute`) and also counts slots per
        block, for `slot_layout` and the load counts (valid_N: count those tokens apart).
        A module call, so that hooks from outside can record or replace the decision
        (model/routing_replay.py)."""
        a = self.args
        logits = router_logits(x_ND, self.weight)
        bias = self.e_score_correction_bias.float()
        if use_fused_route(logits, a):
            w, idx, scores, hist, vhist = _FusedRoute.apply(
                logits, bias, valid_N, a.n_group, a.topk_group, a.num_experts_per_tok, a.norm_topk_prob,
                a.routed_scaling_factor)
            return Routing(w, idx, scores, hist, vhist)
        scores = logits.sigmoid()
        weights, idx = route(scores, bias, a.n_group, a.topk_group, a.num_experts_per_tok, a.norm_topk_prob,
                             a.routed_scaling_factor)
        return Routing(weights, idx, scores)


class GroupedExperts(nn.Module):
    """E SwiGLU experts whose weights live in two stacked tensors, transformers 5's layout:
    gate_up_proj [E, 2I, D] (each expert's gate rows, then its up rows) and down_proj [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        # All three GEMMs (forward and backward) in blockwise FP8; set by enable_fp8_training.
        # The FP8 weight gradient needs each expert's rows to start on a multiple of 128.
        self.fp8 = False
        # Factor on the weights' gradients (parallel.parallelize sets 1/ep: under expert
        # parallelism these gradients already sum every EP peer's tokens; see parallel.py).
        self.grad_scale = 1.0

    def forward(self, x_MD: torch.Tensor, offsets_E: torch.Tensor, row_w_M: torch.Tensor | None = None) -> torch.Tensor:
        """x rows sorted by expert; offsets are the cumulative row ends per expert. row_w_M
        (float32 [M]): each row's gate weight, applied to its SwiGLU output before the down
        projection (see `MoE.routed`)."""
        if x_MD.shape[0] == 0:
            # No rows here (possible under expert parallelism): keep the weights and the input in
            # the graph, so the weights get (zero) gradients and backward reaches the all-to-all
            # that delivered x; every rank then runs the same collectives in backward.
            anchor = sum(w.reshape(-1)[:1].sum() for w in (self.gate_up_proj, self.down_proj))
            return x_MD.new_zeros(0, self.down_proj.shape[1]) + 0.0 * (anchor + x_MD.sum())
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if self.grad_scale != 1.0:
            w_gate_up, w_down = (_ScaleGrad.apply(w, self.grad_scale) for w in (w_gate_up, w_down))
        if self.fp8:
            from .fp8_experts import fp8_swiglu_experts
            return fp8_swiglu_experts(x_MD, w_gate_up, w_down, offsets_E, row_w_M)
        if layers.packs(x_MD):
            # gate and up as one GEMM: x is read once, and backward needs one input-gradient GEMM
            # (K = 2I) instead of two plus the sum of their outputs
            h = swiglu_packed(grouped_mm(x_MD, w_gate_up.transpose(1, 2), offsets_E), row_w_M)
        else:
            # CPU: two GEMMs, so the CPU numbers stay those of separate projections (layers.py)
            w_gate, w_up = w_gate_up.split(w_down.shape[2], dim=1)
            gate = grouped_mm(x_MD, w_gate.transpose(1, 2), offsets_E)
            up = grouped_mm(x_MD, w_up.transpose(1, 2), offsets_E)
            h = swiglu(gate, up) if row_w_M is None else swiglu_forward_reference(gate, up, row_w_M)
        return grouped_mm(h, w_down.transpose(1, 2), offsets_E)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class RoutingSegments(NamedTuple):
    """Each token's sequence, for load counting and the balance loss: seq_N [B*T] holds
    0..num_sequences-1, or -1 for padding. num_sequences may exceed the sequences present
    (ones with no tokens are left out), so it can be a static bound and need no host sync."""

    seq_N: torch.Tensor
    num_sequences: int


def sequence_balance_loss(scores_NE: torch.Tensor, idx_NK: torch.Tensor, seq_N: torch.Tensor,
                          n_experts: int, num_sequences: int | None = None) -> torch.Tensor:
    """sum_e f_e * P_e per sequence, averaged over sequences (the report's eqs. 17-20, without alpha).

    seq_N gives each token's sequence (0..S-1; -1 = padding, left out), so packed samples
    are balanced one by one, exactly as if each had been its own row.
    f_e = E / (K T) * (tokens of the sequence routed to e); P_e = mean over the sequence of
    the affinities normalised over all experts.

    num_sequences: S, or any bound above it (sequences without tokens do not count). Given, the
    loss needs no host sync (no boolean indexing, no .item()): every MoE layer of a training
    step computes it, and each sync would stall the GPU queue. None reads max(seq_N) + 1.
    """
    N, K = idx_NK.shape
    S = int(seq_N.max()) + 1 if num_sequences is None else num_sequences
    if N == 0 or S <= 0:
        return scores_NE.sum() * 0.0
    chosen = torch.zeros_like(scores_NE).scatter_(1, idx_NK, 1.0)  # 1 where the token picked e
    normed = scores_NE / scores_NE.sum(-1, keepdim=True)
    per_seq = segment_sums(torch.cat([chosen, normed], 1), seq_N, S)  # [S, 2E]
    counts, p_sum = per_seq[:, :n_experts], per_seq[:, n_experts:]
    tokens = counts.sum(-1, keepdim=True) / K  # every token picks K distinct experts
    per_token = tokens.clamp(min=1.0)
    f = counts * (n_experts / K) / per_token
    present = (tokens[:, 0] > 0).to(p_sum.dtype)
    return ((f * (p_sum / per_token)).sum(-1) * present).sum() / present.sum().clamp(min=1.0)


# Above this many [sequences x tokens] entries, segment_sums adds rows with index_add_ instead of
# a one-hot GEMM (whose one-hot matrix would take that many floats).
_ONE_HOT_LIMIT = 1 << 24


def segment_sums(v_NC: torch.Tensor, seq_N: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[S, C]: the sum of v's rows per segment (rows with seq -1 left out).

    As a GEMM with the [S, N] one-hot of seq: one launch, the same sums every run, and a
    gradient that is a GEMM too. index_add_ would send every row onto the same few addresses
    with atomics (all N rows onto E counters when a batch is one sequence), which is slower,
    and its float sums change from run to run on CUDA."""
    if num_segments * v_NC.shape[0] <= _ONE_HOT_LIMIT:
        one_hot = (seq_N[None, :] == torch.arange(num_segments, device=seq_N.device)[:, None]).to(v_NC.dtype)
        return one_hot @ v_NC
    keep = (seq_N >= 0).to(v_NC.dtype)[:, None]
    return v_NC.new_zeros(num_segments, v_NC.shape[1]).index_add_(0, seq_N.clamp(min=0), v_NC * keep)


def sequence_ids(segment_ids_BT: torch.Tensor | RoutingSegments | None, B: int, T: int, device) -> RoutingSegments:
    """Flat per-token sequence index: one per (row, segment); -1 for padding (segment < 0).

    Without segments each row is one sequence (no host sync). With packed segments the ids
    are made dense with torch.unique (one sync): the model does this once per forward
    (`Transformer.trunk`) and hands every layer the result."""
    if isinstance(segment_ids_BT, RoutingSegments):
        return segment_ids_BT
    if segment_ids_BT is None:
        return RoutingSegments(torch.arange(B, device=device).repeat_interleave(T), B)
    seg = segment_ids_BT.reshape(B, T).long()
    valid = seg >= 0
    key = torch.arange(B, device=device)[:, None] * (int(seg.max().clamp(min=0)) + 1) + seg.clamp(min=0)
    uniq, inverse = torch.unique(key[valid], return_inverse=True)
    out = torch.full((B * T,), -1, dtype=torch.long, device=device)
    out[valid.reshape(-1)] = inverse
    return RoutingSegments(out, int(uniq.numel()))


def routing_segments_of(segment_ids_BT: torch.Tensor) -> RoutingSegments:
    """`sequence_ids` of a batch's packed segment ids [B, T], worked out where they are (a batch
    still on the CPU: no GPU sync). The sequence count is rounded up to a power of two, a bound
    the balance loss takes as it is (`sequence_balance_loss`): batches that pack different
    numbers of samples then share shapes."""
    B, T = segment_ids_BT.shape
    rs = sequence_ids(segment_ids_BT, B, T, segment_ids_BT.device)
    return RoutingSegments(rs.seq_N, 1 << max(rs.num_sequences - 1, 0).bit_length())


def expert_counts(idx_NK: torch.Tensor, n_experts: int, weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """Slots routed to each expert ([E], int64; float32 with weight_N, each token's slots counted
    weight_N[n] times). torch.bincount would read max(idx) on the host first (a sync)."""
    flat = idx_NK.reshape(-1)
    if weight_N is None:
        return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    w = weight_N.to(torch.float32)[:, None].expand(idx_NK.shape).reshape(-1)
    return torch.zeros(n_experts, dtype=torch.float32, device=flat.device).index_add_(0, flat, w)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = Router(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
            if args.n_shared_experts else None
        )
        # Tokens routed to each expert since the last bias update (summed over micro-batches).
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts, dtype=torch.float32),
                             persistent=False)
        self.balance_loss: torch.Tensor | None = None
        # Set with the experts' own flag by enable_fp8_training. Kept here too because the
        # experts may be wrapped (peft's ParamWrapper for LoRA on expert weights).
        self.fp8_experts = False
        # Expert parallelism (set by parallel.shard_experts): this rank holds experts
        # [expert_offset, expert_offset + E/ep_size) and exchanges rows over ep_group.
        self.ep_group = None
        self.ep_size = 1
        self.expert_offset = 0

    def forward(self, x_BTD: torch.Tensor, segment_ids_BT: torch.Tensor | RoutingSegments | None = None) -> torch.Tensor:
        """segment_ids: packed-sample ids (negative = padding) or their `sequence_ids`, used by
        load counts and the balance loss only; routing itself is per token. The forward has no
        host sync (none without packed segments, none when given RoutingSegments), so the CPU
        can queue the whole layer ahead of the GPU."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        # The shared experts first: their GEMMs keep the GPU busy while the CPU queues the
        # routing's small kernels, which would otherwise each wait on a launch.
        shared = self.shared_experts(x_BTD) if self.shared_experts is not None else None
        seq = sequence_ids(segment_ids_BT, B, T, x_BTD.device) if self.training else None
        # Without segments every token counts towards the loads, and the layout's counts serve.
        valid = seq.seq_N >= 0 if seq is not None and segment_ids_BT is not None else None
        r = self.gate(x_ND, valid)
        layout = self.slot_layout(r)
        # On the GPU the combine adds the shared experts' output in its pass (one rounding, no
        # separate add); on CPU the add stays apart, so CPU numbers are those of the plain sum.
        fuse_shared = shared is not None and fuse_shared_add(x_ND)
        y = self.routed(x_ND, r.weights, layout, shared.view(B * T, D) if fuse_shared else None).view(B, T, D)
        if self.training:  # queued after the experts' GEMMs, for the same reason
            if not recomputing():  # a checkpointed block's second forward must not count again
                with torch.no_grad():
                    self.tokens_per_expert += self.load_counts(r, layout, valid)
            self.balance_loss = None
            if self.args.aux_loss_alpha > 0:
                self.balance_loss = sequence_balance_loss(r.scores, r.idx, seq.seq_N, self.args.n_routed_experts,
                                                          seq.num_sequences)
        if shared is not None and not fuse_shared:
            y = y + shared
        return y

    def slot_layout(self, r: Routing) -> SlotLayout:
        """Each (token, slot)'s row in the expert-grouped buffer. With FP8 experts (and no expert
        parallelism, which pads after the exchange) every expert's rows start on a multiple of
        128, with zero rows between: the FP8 weight gradient's token tiles must not mix two
        experts, and dispatching straight into that layout costs nothing extra."""
        multiple = 128 if self.fp8_experts and self.ep_group is None else 1
        if r.hist is not None:
            return slot_layout(r.idx, r.hist, multiple)
        return slot_layout_reference(r.idx, self.args.n_routed_experts, multiple)

    def load_counts(self, r: Routing, layout: SlotLayout, valid_N: torch.Tensor | None) -> torch.Tensor:
        """Slots routed to each expert by the tokens that count (all, or those valid_N marks)."""
        if valid_N is None:
            return layout.counts
        if r.valid_hist is not None:
            return r.valid_hist.sum(0)
        return expert_counts(r.idx, self.args.n_routed_experts, valid_N)

    def routed(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, layout: SlotLayout,
               residual_ND: torch.Tensor | None = None) -> torch.Tensor:
        """Copy each token into its K experts' rows, run the grouped GEMM, combine weighted (in
        float32, plus residual_ND when given).

        The rows of the expert buffer are grouped by expert; each (token, slot) owns one row
        (`slot_layout`). No host sync (the buffer's size is a static bound). Dispatch and combine
        are permutations plus a sum over a fixed axis, never a scatter-add with collisions, so
        gradients do not change run to run.

        On the GPU (no expert parallelism) the gate weight multiplies each row's SwiGLU output
        instead of the expert's output, which is the same sum since the down projection is
        linear: the combine becomes a plain sum, and its backward no longer reads the experts'
        outputs (which then need not be kept: 2 bytes x K x D per token and layer), while the
        weight's gradient comes out of the SwiGLU backward, which reads that row anyway.
        """
        pad = (layout.counts, layout.offsets)  # lets dispatch zero only the padding rows
        if self.ep_group is None and weights_before_down(x_ND):
            x_MD, row_w = dispatch_weighted_tokens(x_ND, layout.rows, weights_NK, layout.num_rows, pad)
            y_MD = self.experts(x_MD, layout.offsets, row_w)
            if residual_ND is not None:
                residual_ND = residual_ND.to(y_MD.dtype)
            return combine_tokens(y_MD, layout.rows, None, residual_ND, pad).to(x_ND.dtype)
        if self.ep_group is not None:
            from .parallel import expert_parallel_experts
            x_MD = dispatch_tokens(x_ND, layout.rows, layout.num_rows)
            y_MD = expert_parallel_experts(x_MD, layout.counts, self.run_local_experts, self.ep_group)
        else:
            y_MD = self.experts(dispatch_tokens(x_ND, layout.rows, layout.num_rows, pad), layout.offsets)
        if residual_ND is not None:
            residual_ND = residual_ND.to(y_MD.dtype)
        return combine_tokens(y_MD, layout.rows, weights_NK, residual_ND).to(x_ND.dtype)

    def run_local_experts(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The experts held here on rows grouped by expert (counts: rows per local expert).
        Expert parallelism calls this on the rows it received (see `routed` for the padding)."""
        if self.fp8_experts:
            # Each expert's rows start on a multiple of 128 (zero rows between), so no FP8
            # scale tile of the weight gradient mixes two experts. No host sync: the padded
            # size is a static bound.
            from .kernels import pad_offsets_to
            layout = pad_offsets_to(counts_E, 128, num_rows=x_MD.shape[0])
            x_pad = x_MD.new_zeros(layout.num_rows, x_MD.shape[1])
            x_pad[layout.dest_rows] = x_MD
            y_MD = self.experts(x_pad, layout.offsets)[layout.dest_rows]
        else:
            y_MD = self.experts(x_MD, torch.cumsum(counts_E, 0).to(torch.int32))
        return y_MD


@torch.no_grad()
def update_router_bias(model: nn.Module, gamma: float, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Auxiliary-loss-free balancing: b_e += gamma * sign(mean load - load_e) in every MoE layer.

    Call after the optimizer step. Loads are the token counts accumulated since the last call,
    summed over the data-parallel ranks (all-reduce over `group` when distributed is up), so
    every rank applies the same update. gamma = 0 freezes the bias but still resets the counts.
    Returns max/mean load per layer before the update (1.0 = perfectly balanced).
    """
    stats: dict[str, float] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        load = module.tokens_per_expert
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        mean = load.mean()
        if mean > 0:
            stats[name] = float(load.max() / mean)
            if gamma:
                module.gate.e_score_correction_bias += gamma * torch.sign(mean - load)
        load.zero_()
    return stats
