"""The MoE router's selection and the expert-sorted slot layout, as three small Triton kernels.

The torch version (`moe.route`, `moe.expert_counts`, `dispatch.sorted_positions`) launches about
twenty kernels per layer and forward: sigmoid, bias add, group top-2, top-k, gather, normalise,
scale, an `index_add_` of every slot onto E counters (tens of thousands of colliding atomics),
and an argsort of all N*K slots. Each is microseconds of GPU work, but the CPU issues them one by
one while the GPU waits (at 16,384 tokens on an H100 the MoE layer's wall time was about 1 ms
above its kernel time). Here:

    route_kernel      per block of tokens: s = sigmoid(logits), group-limited top-k of s + bias,
                      gate weights from s (normalised, scaled), and the slots per expert of each
                      part of the block (hist [parts, E], plain stores: no atomics)
    scan_blocks_kernel  a few experts per program: the slots of each expert in earlier parts (a
                      running sum down hist), and the counts
    slot_rows_kernel  per part: the experts' row ends (optionally padded), then each slot's row:
                      the expert's start, plus its slots in earlier parts, plus earlier slots of
                      that expert in this part: the order a stable sort by expert gives
    route_backward    d logits = (d scores + d weights through the gather and the normalisation)
                      * s * (1 - s), one pass

Selection ties (equal biased scores) go to the lower expert index. The gate weights and
affinities are float32, as in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .grouped_reference import pad_offsets_to, padded_rows_bound
from .quant import jit_kernels, require_triton
from .reference import cdiv

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None
# Elements of the [block slots, E] one-hot that slot_rows_kernel holds in registers.
_ONE_HOT_BUDGET = 8192
# Elements of a [tokens, E] float32 tile in route_kernel and route_backward_kernel: with more,
# the tiles spill from registers (at E = 256 and 32 tokens the backward took 0.42 ms, with 16
# tokens 0.03 ms).
_TILE = 4096


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _token_tile(N, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N token rows and E_PAD expert columns: (rows, rows in range, cols,
    cols in range, the [rows, cols] mask)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r_ok = rows < N
    cols = tl.arange(0, E_PAD)
    c_ok = cols < E
    return rows, r_ok, cols, c_ok, r_ok[:, None] & c_ok[None, :]


def route_kernel(logits_ptr, bias_ptr, valid_ptr, scores_ptr, w_ptr, idx_ptr, hist_ptr, vhist_ptr, N, scale,
                 E: tl.constexpr, E_PAD: tl.constexpr, G: tl.constexpr, TOPK_G: tl.constexpr,
                 K: tl.constexpr, K_PAD: tl.constexpr, NORM: tl.constexpr, HAS_VALID: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB_N: tl.constexpr):
    """BLOCK_N tokens; their slot counts per SUB_N-token part (slot_rows_kernel's unit)."""
    pid = tl.program_id(0)
    rows, r_ok, cols, c_ok, m = _token_tile(N, E, E_PAD, BLOCK_N)
    s = tl.sigmoid(tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=m, other=0.0))
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], s, mask=m)
    bias = tl.load(bias_ptr + cols, mask=c_ok, other=0.0)
    biased = tl.where(c_ok[None, :], s + bias[None, :], float("-inf"))
    if G > 1:
        # group score = the sum of the group's two best biased scores; keep the TOPK_G best groups
        EG: tl.constexpr = E // G
        g3 = tl.reshape(biased, (BLOCK_N, G, EG))
        best = tl.max(g3, axis=2)
        first = tl.argmax(g3, axis=2)
        within = tl.arange(0, EG)
        second = tl.max(tl.where(within[None, None, :] == first[:, :, None], float("-inf"), g3), axis=2)
        group_score = best + second
        groups = tl.arange(0, G)
        keep = tl.zeros((BLOCK_N, G), dtype=tl.int32)
        for _ in tl.static_range(TOPK_G):
            j = tl.argmax(group_score, axis=1)
            hit = groups[None, :] == j[:, None]
            keep = tl.where(hit, 1, keep)
            group_score = tl.where(hit, float("-inf"), group_score)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], (BLOCK_N, G, EG)), (BLOCK_N, E_PAD))
        biased = tl.where(keep_e != 0, biased, float("-inf"))
    ks = tl.arange(0, K_PAD)
    w = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    idx = tl.zeros((BLOCK_N, K_PAD), dtype=tl.int32)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    hist = tl.zeros((NSUB, E_PAD), dtype=tl.int32)
    if HAS_VALID:
        valid = tl.load(valid_ptr + rows, mask=r_ok, other=0) != 0
        vhist = tl.zeros((NSUB, E_PAD), dtype=tl.int32)
    for k in tl.static_range(K):
        j = tl.argmax(biased, axis=1)
        hit = cols[None, :] == j[:, None]
        s_j = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w = tl.where(ks[None, :] == k, s_j[:, None], w)
        idx = tl.where(ks[None, :] == k, j[:, None], idx)
        hist += tl.sum(tl.reshape((hit & r_ok[:, None]).to(tl.int32), (NSUB, SUB_N, E_PAD)), axis=1)
        if HAS_VALID:
            vhist += tl.sum(tl.reshape((hit & (r_ok & valid)[:, None]).to(tl.int32), (NSUB, SUB_N, E_PAD)), axis=1)
        biased = tl.where(hit, float("-inf"), biased)
    if NORM:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scale
    mk = r_ok[:, None] & (ks[None, :] < K)
    tl.store(w_ptr + rows[:, None] * K + ks[None, :], w, mask=mk)
    tl.store(idx_ptr + rows[:, None] * K + ks[None, :], idx.to(tl.int64), mask=mk)
    parts = pid * NSUB + tl.arange(0, NSUB)
    mh = (parts * SUB_N < N)[:, None] & c_ok[None, :]
    tl.store(hist_ptr + parts[:, None] * E + cols[None, :], hist, mask=mh)
    if HAS_VALID:
        tl.store(vhist_ptr + parts[:, None] * E + cols[None, :], vhist, mask=mh)


def scan_blocks_kernel(hist_ptr, before_ptr, counts_ptr, B,
                       E: tl.constexpr, EB: tl.constexpr, CHUNK: tl.constexpr):
    """EB experts per program: before[b, e] = slots of expert e in blocks < b, and the counts.
    (torch.cumsum over the blocks axis of [blocks, E] ran one thread per column: about 0.18 ms at
    1024 blocks on an H100.)"""
    cols = tl.program_id(0) * EB + tl.arange(0, EB)
    c_ok = cols < E
    carry = tl.zeros((EB,), dtype=tl.int32)
    for b0 in range(0, B, CHUNK):
        rb = (b0 + tl.arange(0, CHUNK)).to(tl.int64)
        m = (rb < B)[:, None] & c_ok[None, :]
        tile = tl.load(hist_ptr + rb[:, None] * E + cols[None, :], mask=m, other=0)
        tl.store(before_ptr + rb[:, None] * E + cols[None, :], carry[None, :] + tl.cumsum(tile, axis=0) - tile, mask=m)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + cols, carry, mask=c_ok)


def slot_rows_kernel(idx_ptr, before_ptr, counts_ptr, offsets_ptr, rows_ptr, N, multiple,
                     E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    c_ok = cols < E
    # each expert's rows rounded up to `multiple`; their ends are the grouped GEMM's offsets
    # (E numbers: every program works them out, the first one stores them)
    owned = (tl.load(counts_ptr + cols, mask=c_ok, other=0) + (multiple - 1)) // multiple * multiple
    ends = tl.cumsum(owned, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + cols, ends, mask=c_ok)
    # where this block's slots of expert e begin: the expert's start + its slots in earlier blocks
    base = (ends - owned).to(tl.int64) + tl.load(before_ptr + pid * E + cols, mask=c_ok, other=0)
    tok = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    ok = (tok < N)[:, None] & (ks < K)[None, :]
    e = tl.load(idx_ptr + tok[:, None] * K + ks[None, :], mask=ok, other=-1).to(tl.int32)
    # slots in flat (token, k) order, one-hot by expert; a running count gives each slot's rank
    one_hot = tl.reshape(e, (BLOCK_N * K_PAD,))[:, None] == cols[None, :]
    rank = tl.cumsum(one_hot.to(tl.int32), axis=0)
    row = tl.sum(tl.where(one_hot, base[None, :] + rank - 1, 0), axis=1)
    tl.store(rows_ptr + tok[:, None] * K + ks[None, :], tl.reshape(row, (BLOCK_N, K_PAD)), mask=ok)


def route_backward_kernel(scores_ptr, idx_ptr, dw_ptr, dscores_ptr, dlogits_ptr, N, scale,
                          E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                          HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, r_ok, cols, _, m = _token_tile(N, E, E_PAD, BLOCK_N)
    s = tl.load(scores_ptr + rows[:, None] * E + cols[None, :], mask=m, other=0.0)
    if HAS_DS:
        ds = tl.load(dscores_ptr + rows[:, None] * E + cols[None, :], mask=m, other=0.0)
    else:
        ds = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
    # the normalisation's backward: w_k = c s_k / D with D = sum_j s_j + eps, so
    # d s_k = c (dw_k / D - sum_j dw_j s_j / D^2)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NORM:
        for k in tl.static_range(K):
            j = tl.load(idx_ptr + rows * K + k, mask=r_ok, other=0)
            s_j = tl.load(scores_ptr + rows * E + j, mask=r_ok, other=0.0)
            dq = tl.load(dw_ptr + rows * K + k, mask=r_ok, other=0.0) * scale
            total += s_j
            dot += dq * s_j
    denom = total + 1e-20
    for k in tl.static_range(K):
        j = tl.load(idx_ptr + rows * K + k, mask=r_ok, other=0)
        dq = tl.load(dw_ptr + rows * K + k, mask=r_ok, other=0.0) * scale
        if NORM:
            g = dq / denom - dot / (denom * denom)
        else:
            g = dq
        ds += tl.where(cols[None, :] == j[:, None], g[:, None], 0.0)
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :], ds * (1.0 - s) * s, mask=m)


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), ("_token_tile",), ("route_kernel", "slot_rows_kernel", "route_backward_kernel", "scan_blocks_kernel"))
    return _KERNELS


def block_tokens(n_experts: int, interpret: bool = False) -> int:
    """Tokens per program of route_kernel: its [tokens, E] float32 tiles, and the per-part
    count table, stay in registers (on an H100 at E = 256 and 16,384 tokens: 16-token blocks
    0.15 ms; 64-token blocks 1.07 ms). Under the interpreter 8."""
    if interpret:
        return 8
    return max(1, min(64, _TILE // _pow2(n_experts)))


def slot_block_tokens(n_experts: int, top_k: int, interpret: bool = False) -> int:
    """Tokens per program of slot_rows_kernel, and per row of route_forward's count table: its
    [tokens * K, E] one-hot stays in registers. Under the interpreter 2, so small test inputs
    span several rows and several route blocks."""
    if interpret:
        return 2
    return max(1, min(block_tokens(n_experts), _ONE_HOT_BUDGET // (_pow2(top_k) * _pow2(n_experts))))


def fused_route_supported(n_experts: int, n_group: int) -> bool:
    """Group-limited routing reshapes [tokens, E] into [tokens, groups, E/groups] in registers,
    which Triton allows for power-of-two sizes only; other shapes use the torch route."""
    if n_group <= 1:
        return True
    return n_experts % n_group == 0 and _pow2(n_experts) == n_experts and _pow2(n_group) == n_group


def route_forward(logits_NE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                  norm_topk_prob: bool, routed_scaling_factor: float, valid_N: torch.Tensor | None = None):
    """(weights [N, K] fp32, idx [N, K] int64, scores [N, E] fp32, hist [blocks, E] int32,
    valid hist [blocks, E] int32 or None): the numbers of `moe.route(sigmoid(logits), bias, ...)`
    and per-block slot counts (only valid tokens' slots in the second)."""
    if logits_NE.dim() != 2 or logits_NE.dtype != torch.float32:
        raise ValueError(f"router logits must be float32 [N, E], got {logits_NE.dtype} {tuple(logits_NE.shape)}")
    N, E = logits_NE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if not fused_route_supported(E, n_group):
        raise ValueError(f"{n_group} groups of {E} experts: the fused route needs powers of two")
    if n_group > 1 and not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in 1..{n_group}, got {topk_group}")
    built = require_triton(logits_NE)
    logits_NE = logits_NE.contiguous()
    bias = bias_E.to(device=logits_NE.device, dtype=torch.float32).contiguous()
    bn = block_tokens(E, built.interpret)
    sub = slot_block_tokens(E, top_k, built.interpret)
    parts = cdiv(N, sub)
    dev = logits_NE.device
    scores = torch.empty(N, E, dtype=torch.float32, device=dev)
    weights = torch.empty(N, top_k, dtype=torch.float32, device=dev)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=dev)
    hist = torch.empty(parts, E, dtype=torch.int32, device=dev)
    vhist = torch.empty(parts, E, dtype=torch.int32, device=dev) if valid_N is not None else None
    if N:
        _kernels()[0][(cdiv(N, bn),)](
            logits_NE, bias, valid_N.contiguous() if valid_N is not None else logits_NE, scores, weights, idx,
            hist, vhist if vhist is not None else hist, N, float(routed_scaling_factor),
            E=E, E_PAD=_pow2(E), G=max(n_group, 1), TOPK_G=max(topk_group, 1) if n_group > 1 else 1,
            K=top_k, K_PAD=_pow2(top_k), NORM=bool(norm_topk_prob), HAS_VALID=valid_N is not None,
            BLOCK_N=bn, SUB_N=sub, num_warps=4)
    return weights, idx, scores, hist, vhist


class SlotLayout(NamedTuple):
    """Where each (token, slot) goes in the buffer of rows grouped by expert.

    rows [N, K] int64: slot (n, k)'s row; an expert's slots in (token, k) order, as a stable
    sort by expert gives. counts [E] int32: slots per expert. offsets [E] int32: the cumulative
    row ends per expert, as the grouped GEMMs take them. num_rows: the buffer's rows (a static
    bound, so no host sync; with padding, rows past offsets[-1] belong to no expert)."""

    rows: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_rows: int


def slot_layout(idx_NK: torch.Tensor, hist_BE: torch.Tensor, multiple: int = 1) -> SlotLayout:
    """The layout from route_forward's idx and per-block counts, in two launches
    (scan_blocks_kernel, slot_rows_kernel) and no host sync. multiple > 1 starts every expert's
    rows on a multiple of it, with unowned rows between."""
    N, K = idx_NK.shape
    blocks, E = hist_BE.shape
    dev = idx_NK.device
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if N == 0:
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
        return SlotLayout(torch.empty(0, K, dtype=torch.int64, device=dev), counts, counts.clone(),
                          padded_rows_bound(0, E, multiple))
    built = require_triton(idx_NK, hist_BE)
    sub = slot_block_tokens(E, K, built.interpret)
    if blocks != cdiv(N, sub):
        raise ValueError(f"hist has {blocks} rows; route_forward makes {cdiv(N, sub)} for {N} tokens")
    before = torch.empty_like(hist_BE)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E, dtype=torch.int32, device=dev)
    rows = torch.empty(N, K, dtype=torch.int64, device=dev)
    # small chunks under the interpreter, so the tests carry counts across chunks
    eb, chunk = (4, 2) if built.interpret else (8, 1024)
    rows_kernel, scan = _kernels()[1], _kernels()[3]
    scan[(cdiv(E, eb),)](hist_BE, before, counts, blocks, E=E, EB=eb, CHUNK=chunk, num_warps=4)
    rows_kernel[(blocks,)](idx_NK.contiguous(), before, counts, offsets, rows, N, multiple,
                           E=E, E_PAD=_pow2(E), K=K, K_PAD=_pow2(K), BLOCK_N=sub, num_warps=4)
    return SlotLayout(rows, counts, offsets, padded_rows_bound(N * K, E, multiple))


def slot_layout_reference(idx_NK: torch.Tensor, n_experts: int, multiple: int = 1) -> SlotLayout:
    """slot_layout in torch: a stable argsort of the slots by expert (`sorted_positions`), then,
    with multiple > 1, `pad_offsets_to`'s move of each sorted row into the padded layout."""
    from ..dispatch import sorted_positions  # the model layer's torch layout (it imports kernels)
    flat = idx_NK.reshape(-1)
    # index_add_ rather than bincount: bincount reads max(idx) on the host first (a sync)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    rows = sorted_positions(idx_NK)[0]
    if multiple <= 1:
        return SlotLayout(rows, counts, torch.cumsum(counts, 0, dtype=torch.int32), flat.numel())
    padded = pad_offsets_to(counts, multiple, num_rows=flat.numel())
    return SlotLayout(padded.dest_rows[rows], counts, padded.offsets, padded.num_rows)


def route_backward(scores_NE: torch.Tensor, idx_NK: torch.Tensor, dw_NK: torch.Tensor | None,
                   dscores_NE: torch.Tensor | None, norm_topk_prob: bool, routed_scaling_factor: float) -> torch.Tensor:
    """d logits [N, E] float32 from the gradients of route_forward's weights and scores."""
    N, E = scores_NE.shape
    K = idx_NK.shape[1]
    dlogits = torch.empty(N, E, dtype=torch.float32, device=scores_NE.device)
    if dw_NK is None:
        dw_NK = torch.zeros(N, K, dtype=torch.float32, device=scores_NE.device)
    if N:
        bn = max(1, min(32, _TILE // _pow2(E)))
        _kernels()[2][(cdiv(N, bn),)](
            scores_NE, idx_NK, dw_NK.float().contiguous(),
            dscores_NE.float().contiguous() if dscores_NE is not None else scores_NE, dlogits, N,
            float(routed_scaling_factor), E=E, E_PAD=_pow2(E), K=K, NORM=bool(norm_topk_prob),
            HAS_DS=dscores_NE is not None, BLOCK_N=bn, num_warps=4)
    return dlogits
