"""Autograd for the MoE layer's token dispatch and weighted combine (kernels/permute.py).

A slot layout (`kernels/route.py`'s `slot_layout`, or `sorted_positions` here) decides where
each (token, slot) goes in the expert-sorted buffer; `dispatch_tokens` copies every token into
its K rows, `combine_tokens` sums the K expert outputs back, weighted by the gate in float32
(plus an optional residual in the same pass). Both are deterministic (no scatter-add).
"""

from __future__ import annotations

import torch

from .kernels import permute


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, rows_NK, num_rows: int):
        ctx.save_for_backward(rows_NK)
        return permute.dispatch(x_ND, rows_NK, num_rows)

    @staticmethod
    def backward(ctx, dbuf_MD):
        (rows_NK,) = ctx.saved_tensors
        return permute.dispatch_backward(dbuf_MD, rows_NK), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, rows_NK, w_NK, residual_ND):
        ctx.save_for_backward(y_MD, rows_NK, w_NK)
        ctx.w_dtype = w_NK.dtype
        return permute.combine(y_MD, rows_NK, w_NK, residual_ND)

    @staticmethod
    def backward(ctx, dout_ND):
        y_MD, rows_NK, w_NK = ctx.saved_tensors
        dy, dw = permute.combine_backward(dout_ND, y_MD, rows_NK, w_NK)
        return (dy, None, dw.to(ctx.w_dtype) if ctx.needs_input_grad[2] else None,
                dout_ND if ctx.needs_input_grad[3] else None)


def dispatch_tokens(x_ND: torch.Tensor, rows_NK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, D] with x[n] at rows[n, k] for every k; rows no slot owns are zero."""
    return _Dispatch.apply(x_ND, rows_NK, num_rows)


def combine_tokens(y_MD: torch.Tensor, rows_NK: torch.Tensor, w_NK: torch.Tensor,
                   residual_ND: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] in y's dtype: (residual[n] +) sum over k of w[n, k] * y[rows[n, k]], summed in
    float32 and rounded once."""
    return _Combine.apply(y_MD, rows_NK, w_NK, residual_ND)


def sorted_positions(idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [N, K], order): slot (n, k)'s row when all N*K slots are sorted by expert
    (stable, so a token's slots keep their order within an expert), and the sort itself."""
    flat = idx_NK.flatten()
    order = torch.argsort(flat, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return pos.view(idx_NK.shape), order
