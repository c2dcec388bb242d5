"""The routed experts' SwiGLU MLP in FP8, as one autograd function.

    gu = x @ [W_gate; W_up]^T        one grouped FP8 GEMM, N = 2I (x quantised once)
    h  = silu(gu[:, :I]) * gu[:, I:]  fused with its 1x128 quantisation (never stored)
    y  = h @ W_down^T                 grouped FP8 GEMM

Backward, every GEMM in FP8 as the report does:
    dh       = dy @ W_down                        input gradient of the down projection
    dW_down  = dy^T @ h                           h recomputed from gu (the report also caches
                                                  the SwiGLU input and recomputes its output)
    [dg|du]  = SwiGLU backward, one fused pass
    dx       = [dg|du] @ [W_gate; W_up]           one GEMM with K = 2I
    dW_gu    = [dg|du]^T @ x                      one weight-gradient GEMM, split in two

Fusing gate and up halves the quantisations of x and the GEMM launches, and the input
gradient needs no sum of two GEMM outputs. Saved for backward: gu (bf16, what plain autograd
keeps too), the FP8 transpose of x and the FP8 weights.

Rows must be sorted by expert with every expert's rows starting on a multiple of 128 (the
FP8 weight gradient's token tiles; `MoE.routed` pads them).
"""

from __future__ import annotations

import torch

from . import kernels as K
from .kernels.reference import BLOCK
from .kernels.swiglu import swiglu_backward


def quantise_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 FP8 of [W_gate; W_up] ([E, 2I, D]). With I a multiple of 128 the blocks of the
    two halves never mix, so each is quantised apart and only the 1-byte results are joined."""
    if w_gate.shape[1] % BLOCK == 0:
        gq, gs = K.weight_quant(w_gate.detach())
        uq, us = K.weight_quant(w_up.detach())
        return torch.cat([gq, uq], 1), torch.cat([gs, us], 1)
    return K.weight_quant(torch.cat([w_gate.detach(), w_up.detach()], 1))


def _k_major_t(t: torch.Tensor) -> torch.Tensor:
    """[E, A, B] -> contiguous [E, B, A]."""
    return t.transpose(1, 2).contiguous()


class _FP8SwiGLUExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w_gate_EID, w_up_EID, w_down_EDI, offsets_E):
        inter = w_gate_EID.shape[1]
        xq, xs = K.act_quant(x_MD)
        wgu_q, wgu_s = quantise_gate_up(w_gate_EID, w_up_EID)
        gu = K.grouped_fp8(xq, xs, wgu_q, wgu_s, offsets_E, out_dtype=x_MD.dtype)
        hq, hs = K.swiglu_act_quant(gu[:, :inter], gu[:, inter:])
        wd_q, wd_s = K.weight_quant(w_down_EDI.detach())
        y = K.grouped_fp8(hq, hs, wd_q, wd_s, offsets_E, out_dtype=x_MD.dtype)
        need_gu_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.xt = K.act_quant_t(x_MD) if need_gu_grad else None
        ctx.save_for_backward(gu, wgu_q, wgu_s, wd_q, wd_s, offsets_E)
        ctx.inter = inter
        ctx.dtypes = (w_gate_EID.dtype, w_up_EID.dtype, w_down_EDI.dtype)
        return y

    @staticmethod
    def backward(ctx, dy_MD):
        gu, wgu_q, wgu_s, wd_q, wd_s, offsets_E = ctx.saved_tensors
        inter = ctx.inter
        gate, up = gu[:, :inter], gu[:, inter:]
        dy_MD = dy_MD.contiguous()
        dx = dw_gate = dw_up = dw_down = None

        dyq, dys = K.act_quant(dy_MD)
        # The input gradients multiply by W^T. A transposed view of the FP8 weight puts N, not K,
        # innermost, and the FP8 tensor-core path then runs at about a quarter of its speed
        # (H100: 146 vs 518 TFLOP/s); one contiguous copy of the 1-byte weight costs ~0.1 ms.
        dh = K.grouped_fp8(dyq, dys, _k_major_t(wd_q), _k_major_t(wd_s), offsets_E, out_dtype=dy_MD.dtype)
        if ctx.needs_input_grad[3]:
            h = K.reference.swiglu(gate, up)  # float32, as the forward quantised it
            hq_t, hs_t = K.act_quant_t(h)
            del h
            dyq_t, dys_t = K.act_quant_t(dy_MD)
            dw_down = K.grouped_fp8_wgrad(dyq_t, dys_t, hq_t, hs_t, offsets_E).to(ctx.dtypes[2])
        dgu = swiglu_backward(gate, up, dh)
        del dh
        if ctx.needs_input_grad[0]:
            gq, gs = K.act_quant(dgu)
            dx = K.grouped_fp8(gq, gs, _k_major_t(wgu_q), _k_major_t(wgu_s), offsets_E, out_dtype=dy_MD.dtype)
        if ctx.xt is not None:
            gq_t, gs_t = K.act_quant_t(dgu)
            xq_t, xs_t = ctx.xt
            dw_gu = K.grouped_fp8_wgrad(gq_t, gs_t, xq_t, xs_t, offsets_E)
            if ctx.needs_input_grad[1]:
                dw_gate = dw_gu[:, :inter].to(ctx.dtypes[0])
            if ctx.needs_input_grad[2]:
                dw_up = dw_gu[:, inter:].to(ctx.dtypes[1])
        ctx.xt = None
        return dx, dw_gate, dw_up, dw_down, None


def fp8_swiglu_experts(x_MD: torch.Tensor, w_gate_EID: torch.Tensor, w_up_EID: torch.Tensor,
                       w_down_EDI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """sum over experts of silu(x_e W_gate[e]^T) * (x_e W_up[e]^T) @ W_down[e]^T, rows sorted by
    expert (offsets: cumulative row ends, multiples of 128), every GEMM in blockwise FP8."""
    return _FP8SwiGLUExpertsFn.apply(x_MD, w_gate_EID, w_up_EID, w_down_EDI, offsets_E)
