"""Torch references for the grouped GEMMs (per-expert loops, FP8 dequantised per block in
float32) and the 128-row padded layout the FP8 weight gradient needs. See grouped.py for the
layout and the FP8 conventions."""

from __future__ import annotations

from typing import NamedTuple

import torch

QBLOCK = 128  # FP8 scale tile along the reduction dimension (and weight block side)

# --------------------------------------------------------------------------------------------
# torch references (always available; per-expert loops with a host sync on the offsets)
# --------------------------------------------------------------------------------------------


def _segments(offsets: torch.Tensor):
    start = 0
    for e, end in enumerate(offsets.tolist()):
        yield e, start, end
        start = end


def _expand_cols(s: torch.Tensor, cols: int) -> torch.Tensor:
    """Per-128-column scales [..., ceil(cols/128)] -> one scale per column [..., cols]."""
    return s.float().repeat_interleave(QBLOCK, dim=-1)[..., :cols]


def _dequant_cols(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1x128 tiles along the last dimension: q [R, C], s [R, ceil(C/128)] -> float32 [R, C]."""
    return q.float() * _expand_cols(s, q.shape[-1])


def _dequant_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """128x128 blocks: q [R, C], s [ceil(R/128), ceil(C/128)] -> float32 [R, C]."""
    R, C = q.shape
    return q.float() * s.float().repeat_interleave(QBLOCK, 0).repeat_interleave(QBLOCK, 1)[:R, :C]


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x_e @ w[e].T in float32, returned in x's dtype; rows past offsets[-1] are 0."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e, s, t in _segments(offsets):
        if t > s:
            out[s:t] = x[s:t].float() @ w[e].float().T
    return out.to(x.dtype)


def grouped_gemm_fp8_reference(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                               offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 operands dequantised per block in float32, then the per-expert product."""
    x = _dequant_cols(xq, xs)
    out = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float32, device=xq.device)
    for e, s, t in _segments(offsets):
        if t > s:
            out[s:t] = x[s:t] @ _dequant_blocks(wq[e], ws[e]).T
    return out.to(out_dtype)


def grouped_gemm_wgrad_reference(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW[e] = dy_e^T @ x_e in float32 ([E, N, K]); experts without rows get zeros."""
    E = offsets.shape[0]
    dw = torch.zeros(E, dy.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for e, s, t in _segments(offsets):
        if t > s:
            dw[e] = dy[s:t].float().T @ x[s:t].float()
    return dw.to(out_dtype)


def grouped_gemm_wgrad_fp8_reference(dyq_t: torch.Tensor, dys_t: torch.Tensor, xq_t: torch.Tensor,
                                     xs_t: torch.Tensor, offsets: torch.Tensor,
                                     out_dtype: torch.dtype = torch.float32, check: bool = True) -> torch.Tensor:
    """dW[e] = dy_e^T @ x_e from the 1x128-along-M quantisations dyq_t [N, M], xq_t [K, M]."""
    if check:
        check_fp8_wgrad_offsets(offsets)
    dy_t, x_t = _dequant_cols(dyq_t, dys_t), _dequant_cols(xq_t, xs_t)
    E = offsets.shape[0]
    dw = torch.zeros(E, dyq_t.shape[0], xq_t.shape[0], dtype=torch.float32, device=xq_t.device)
    for e, s, t in _segments(offsets):
        if t > s:
            dw[e] = dy_t[:, s:t] @ x_t[:, s:t].T
    return dw.to(out_dtype)


def check_fp8_wgrad_offsets(offsets: torch.Tensor, block: int = QBLOCK) -> None:
    """Raise unless every expert's row range starts (and ends) on a multiple of `block`.

    The FP8 weight gradient reduces over rows in 128-row scale tiles, which must not straddle
    two experts. One host sync (a single reduction on the offsets' device).
    """
    if bool((offsets.remainder(block) != 0).any()):
        raise ValueError(
            f"grouped FP8 weight gradient needs every expert offset to be a multiple of {block} "
            f"(pad each expert's rows with zero rows, see pad_offsets_to); got offsets "
            f"{offsets.tolist()}"
        )


# --------------------------------------------------------------------------------------------
# Padding to aligned expert segments (for the FP8 path)
# --------------------------------------------------------------------------------------------


class PaddedLayout(NamedTuple):
    offsets: torch.Tensor    # int32 [E]: cumulative padded row ends, all multiples of `multiple`
    dest_rows: torch.Tensor  # int64 [M]: row of the padded layout that each sorted row goes to
    num_rows: int            # rows to allocate for the padded layout (>= offsets[-1], a multiple)


def padded_rows_bound(rows: int, n_experts: int, multiple: int) -> int:
    """A static bound on the rows of a layout where each of n_experts experts' rows (rows in
    all) is rounded up to `multiple`: no host sync needed to allocate it."""
    if multiple <= 1:
        return rows
    return (rows + n_experts * (multiple - 1)) // multiple * multiple


def pad_offsets_to(counts_E: torch.Tensor, multiple: int = QBLOCK, num_rows: int | None = None,
                   exact: bool = False) -> PaddedLayout:
    """Layout in which every expert's rows start on a multiple of `multiple`.

    counts_E: tokens per expert (int, any device); num_rows: their sum, the number of sorted
    rows, which the caller knows from a shape (pass it: otherwise it is read with one host
    sync). Everything is computed on the counts' device.

    Expert e owns padded rows offsets[e-1]..offsets[e] (its count rounded up to `multiple`);
    sorted row i, of expert e, goes to padded row dest_rows[i] = i - start_e + padded_start_e,
    so `x_pad = x.new_zeros(layout.num_rows, D); x_pad[layout.dest_rows] = x` builds the padded
    input (padding rows zero) and `y = y_pad[layout.dest_rows]` brings results back.

    num_rows is a static upper bound, floor((M + E*(multiple-1)) / multiple) * multiple, so
    the allocation needs no host sync; rows past offsets[-1] belong to no expert (the forward
    kernels write zeros there, the weight gradients ignore them). exact=True reads the true
    total offsets[-1] instead (one host sync).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    counts = counts_E.to(torch.int64)
    E = counts.shape[0]
    if num_rows is None:
        num_rows = int(counts.sum())  # the one host sync; pass num_rows to avoid it
    padded_counts = (counts + multiple - 1) // multiple * multiple
    padded_ends = torch.cumsum(padded_counts, 0)
    ends = torch.cumsum(counts, 0)
    rows = torch.arange(num_rows, device=counts.device)
    expert = torch.searchsorted(ends, rows, right=True).clamp_(max=max(E - 1, 0))
    dest = rows - (ends - counts)[expert] + (padded_ends - padded_counts)[expert]
    if exact:
        total = int(padded_ends[-1]) if E else 0
    else:
        total = padded_rows_bound(num_rows, E, multiple)
    return PaddedLayout(padded_ends.to(torch.int32), dest, total)
