"""The routed experts' SwiGLU MLP in FP8, as one autograd function.

    gu = x @ W_gate_up^T             one grouped FP8 GEMM, N = 2I (x quantised once);
                                     W_gate_up [E, 2I, D] = [W_gate; W_up] per expert
    h  = silu(gu[:, :I]) * gu[:, I:]  fused with its 1x128 quantisation (never stored); times
                                     the row's gate weight when one is given (row_w)
    y  = h @ W_down^T                 grouped FP8 GEMM

Backward, every GEMM in FP8 as the report does:
    dh       = dy @ W_down                        input gradient of the down projection
    dW_down  = dy^T @ h                           h recomputed from gu (the report also caches
                                                  the SwiGLU input and recomputes its output)
    [dg|du]  = SwiGLU backward, one fused pass (and the row weights' gradient)
    dx       = [dg|du] @ [W_gate; W_up]           one GEMM with K = 2I
    dW_gu    = [dg|du]^T @ x                      one weight-gradient GEMM

Fusing gate and up halves the quantisations of x and the GEMM launches, and the input
gradient needs no sum of two GEMM outputs. Saved for backward: gu (bf16, what plain autograd
keeps too), the FP8 transpose of x and the transposed FP8 weights.

Rows must be sorted by expert with every expert's rows starting on a multiple of 128 (the
FP8 weight gradient's token tiles; `MoE.routed` pads them).
"""

from __future__ import annotations

import torch

from . import kernels as K
from .kernels.swiglu import swiglu_backward


class _FP8SwiGLUExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w_gate_up_E2ID, w_down_EDI, offsets_E, row_w_M):
        inter = w_down_EDI.shape[2]
        xq, xs = K.act_quant(x_MD)
        # One pass per weight writes its FP8 blocks twice: as is for the forward, and transposed
        # (K innermost) for the input gradient. On a transposed view the FP8 tensor-core path
        # runs at about a quarter of its speed (H100: 146 vs 518 TFLOP/s), and a separate
        # transpose of the 1-byte weights cost more than the quantisation itself.
        wgu_q, wgu_s, wgu_qt, wgu_st = K.weight_quant_t(w_gate_up_E2ID.detach())
        gu = K.grouped_fp8(xq, xs, wgu_q, wgu_s, offsets_E, out_dtype=x_MD.dtype)
        del xq, xs, wgu_q, wgu_s
        hq, hs = K.swiglu_act_quant(gu[:, :inter], gu[:, inter:], row_w_M)
        wd_q, wd_s, wd_qt, wd_st = K.weight_quant_t(w_down_EDI.detach())
        y = K.grouped_fp8(hq, hs, wd_q, wd_s, offsets_E, out_dtype=x_MD.dtype)
        ctx.xt = K.act_quant_t(x_MD) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(gu, wgu_qt, wgu_st, wd_qt, wd_st, offsets_E, row_w_M)
        ctx.inter = inter
        ctx.dtypes = (w_gate_up_E2ID.dtype, w_down_EDI.dtype)
        return y

    @staticmethod
    def backward(ctx, dy_MD):
        gu, wgu_qt, wgu_st, wd_qt, wd_st, offsets_E, row_w = ctx.saved_tensors
        inter = ctx.inter
        gate, up = gu[:, :inter], gu[:, inter:]
        dy_MD = dy_MD.contiguous()
        dx = dw_gate_up = dw_down = drow_w = None

        dyq, dys = K.act_quant(dy_MD)
        dh = K.grouped_fp8(dyq, dys, wd_qt, wd_st, offsets_E, out_dtype=dy_MD.dtype)
        del dyq, dys
        # Weight gradients come out of the kernel in the weight's own dtype (float32 sums,
        # rounded once), so no float32 [E, N, K] copy is written and converted afterwards.
        if ctx.needs_input_grad[2]:
            hq_t, hs_t = K.swiglu_act_quant_t(gate, up, row_w)  # h recomputed in fp32 as the forward had it
            dyq_t, dys_t = K.act_quant_t(dy_MD)
            dw_down = K.grouped_fp8_wgrad(dyq_t, dys_t, hq_t, hs_t, offsets_E, out_dtype=ctx.dtypes[1])
            del dyq_t, dys_t, hq_t, hs_t
        if row_w is None:
            dgu = swiglu_backward(gate, up, dh)
        else:
            dgu, drow_w = swiglu_backward(gate, up, dh, row_w)
        del dh
        if ctx.needs_input_grad[0]:
            gq, gs = K.act_quant(dgu)
            dx = K.grouped_fp8(gq, gs, wgu_qt, wgu_st, offsets_E, out_dtype=dy_MD.dtype)
            del gq, gs
        if ctx.xt is not None:
            gq_t, gs_t = K.act_quant_t(dgu)  # [2I, M]: rows 0..I-1 are the gate's, the rest up's
            xq_t, xs_t = ctx.xt
            dw_gate_up = K.grouped_fp8_wgrad(gq_t, gs_t, xq_t, xs_t, offsets_E, out_dtype=ctx.dtypes[0])
        ctx.xt = None
        return dx, dw_gate_up, dw_down, None, drow_w if ctx.needs_input_grad[4] else None


def fp8_swiglu_experts(x_MD: torch.Tensor, w_gate_up_E2ID: torch.Tensor, w_down_EDI: torch.Tensor,
                       offsets_E: torch.Tensor, row_w_M: torch.Tensor | None = None) -> torch.Tensor:
    """sum over experts of silu(x_e W_gate[e]^T) * (x_e W_up[e]^T) @ W_down[e]^T, with
    W_gate_up[e] = [W_gate[e]; W_up[e]] ([E, 2I, D]), rows sorted by expert (offsets: cumulative
    row ends, multiples of 128), every GEMM in blockwise FP8. row_w_M (float32 [M]) scales each
    row's SwiGLU output before the down projection."""
    return _FP8SwiGLUExpertsFn.apply(x_MD, w_gate_up_E2ID, w_down_EDI, offsets_E, row_w_M)
