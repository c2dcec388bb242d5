"""FP8 training as the report does it: every GEMM of a linear or expert layer in e4m3.

Forward      y  = x  @ W^T     x quantised 1x128 (per token, per 128 input features),
                                W quantised 128x128
Input grad   dx = dy @ W       dy quantised 1x128 along the output features; the same FP8
                                W, read transposed (its 128x128 blocks transpose with it)
Weight grad  dW = dy^T @ x     both quantised in tiles of 128 tokens (1x128 of the transposes)

Each GEMM accumulates in fp32 and applies the two scales once per 128 of K (the report's
"promotion"). The master weights, their gradients and the optimizer stay in the parameter's
own dtype; the FP8 copy of a weight is made per forward. What backward keeps of the input is
its FP8 transpose and scales (a quarter of fp32, half of bf16), which is also how the report
saves activation memory.

`enable_fp8_training(model)` switches a model's projections and routed experts in place.
The embedding, output head, router gate, norms and the attention core (softmax) stay in
high precision, as the report keeps them. Parameter names, and so checkpoints, do not change.

On CPU the kernels' torch references run the same arithmetic, so tests check this module's
gradients there; on CUDA the Triton / cuBLAS kernels do.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels as K


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_MK = _rows(x)
        xq, xs = K.act_quant(x_MK)
        # The weight's FP8 blocks also written transposed (K innermost), in the same pass: the
        # input gradient reads W that way, and handing cuBLAS the transposed view of wq made
        # it copy the FP8 weight in every backward (0.07 ms for [5632, 2048] on an H100).
        wq, ws, wq_t, ws_t = (t[0] for t in K.weight_quant_t(weight.detach()[None]))
        y = K.fp8_matmul(xq, xs, wq, ws, out_dtype=x.dtype, b_block=True)
        # tokens become K of the weight-gradient GEMM
        ctx.xt = K.act_quant_t(x_MK) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(wq_t, ws_t)
        ctx.weight_dtype = weight.dtype
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wq_t, ws_t = ctx.saved_tensors
        dy_MN = _rows(dy.contiguous())
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq, dys = K.act_quant(dy_MN)
            dx = K.fp8_matmul(dyq, dys, wq_t, ws_t, out_dtype=dy.dtype, b_block=True)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dyq_t, dys_t = K.act_quant_t(dy_MN)
            xq_t, xs_t = ctx.xt
            # summed in float32 and rounded once to the weight's dtype by the GEMM itself
            out = ctx.weight_dtype if ctx.weight_dtype in (torch.bfloat16, torch.float32) else torch.float32
            dw = K.fp8_matmul(dyq_t, dys_t, xq_t, xs_t, out_dtype=out, b_block=False).to(ctx.weight_dtype)
        ctx.xt = None
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with all three GEMMs of training in blockwise FP8."""
    return _FP8LinearFn.apply(x, weight)


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward and backward GEMMs run in blockwise FP8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            raise ValueError("FP8Linear has no bias path; the DeepSeek-V3 projections have none")
        return fp8_linear(x, self.weight)


class _FP8GroupedFn(torch.autograd.Function):
    """Per-expert x_e @ W_e^T over rows sorted by expert, all GEMMs in FP8.

    The weight gradient quantises tokens in tiles of 128 along M, so no tile may hold rows of
    two experts: callers pass offsets that are multiples of 128 (the MoE layer pads each
    expert's rows with zeros; see `MoE.routed`).
    """

    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets_E):
        xq, xs = K.act_quant(x_MK)
        # the transposed copy (K innermost) serves the input gradient: see fp8_experts.py
        wq, ws, wq_t, ws_t = K.weight_quant_t(w_ENK.detach())
        y = K.grouped_fp8(xq, xs, wq, ws, offsets_E, out_dtype=x_MK.dtype)
        ctx.xt = K.act_quant_t(x_MK) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(wq_t, ws_t, offsets_E)
        ctx.weight_dtype = w_ENK.dtype
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        wq_t, ws_t, offsets_E = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq, dys = K.act_quant(dy_MN)
            dx = K.grouped_fp8(dyq, dys, wq_t, ws_t, offsets_E, out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:
            dyq_t, dys_t = K.act_quant_t(dy_MN)
            xq_t, xs_t = ctx.xt
            dw = K.grouped_fp8_wgrad(dyq_t, dys_t, xq_t, xs_t, offsets_E, out_dtype=ctx.weight_dtype)
        ctx.xt = None
        return dx, dw, None


def fp8_grouped_linear(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _FP8GroupedFn.apply(x_MK, w_ENK, offsets_E)


# Projections the report keeps out of FP8: they are small or sensitive (the output head and
# the value/reward head see every token's final state; the router decides the routing).
# (The embedding and the router gate are not nn.Linear, so they are never switched.)
KEEP_HIGH_PRECISION = ("lm_head", "score")


def enable_fp8_training(model: nn.Module) -> dict[str, int]:
    """Switch a Transformer's linear projections and routed experts to FP8 GEMMs, in place.

    Returns counts of what was switched. Weights whose dimensions are not multiples of 16
    stay in high precision (e4m3 GEMMs need 16-byte aligned rows).
    """
    from .moe import MoE, GroupedExperts

    switched = {"linear": 0, "experts": 0, "kept": 0}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.fp8_experts = True  # pads each expert's rows to 128 for the FP8 weight gradient
        if isinstance(module, GroupedExperts):
            module.fp8 = True
            switched["experts"] += 1
        elif type(module) is nn.Linear:
            leaf = name.rsplit(".", 1)[-1]
            aligned = module.in_features % 16 == 0 and module.out_features % 16 == 0
            if leaf in KEEP_HIGH_PRECISION or module.bias is not None or not aligned:
                switched["kept"] += 1
                continue
            module.__class__ = FP8Linear
            switched["linear"] += 1
    return switched
