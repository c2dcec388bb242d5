"""SwiGLU backward in one pass: the gradients of gate and up, side by side.

With h = silu(g) * u and dh its gradient:
    du = dh * silu(g)
    dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
written as one [M, 2I] tensor [dg | du], the layout the fused gate/up expert GEMM reads for
its input and weight gradients. Done with torch ops this is about ten passes over M x I
float32 temporaries; the kernel reads g, u, dh once and writes the result once.

`swiglu_backward` dispatches: Triton on CUDA, the torch reference elsewhere (tests run the
kernel under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import torch

from .quant import HAVE_TRITON, build, require_triton
from .reference import cdiv

tl = None  # bound by _kernel(); the kernel body looks it up as a module global
_KERNEL = None
_BLOCK_M, _BLOCK_I = 16, 128


def swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """[dg | du] in dh's dtype, computed in float32."""
    _check(gate, up, dh)
    g = gate.float()
    sig = torch.sigmoid(g)
    d = dh.float()
    dg = d * up.float() * (sig * (1.0 + g * (1.0 - sig)))
    du = d * (g * sig)
    return torch.cat([dg, du], dim=-1).to(dh.dtype)


def _check(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> None:
    if gate.dim() != 2 or gate.shape != up.shape or gate.shape != dh.shape:
        raise ValueError(f"gate, up and dh must share one [M, I] shape, got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)} and {tuple(dh.shape)}")


def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, out_ptr, M, I,
                       stride_gm, stride_gi, stride_um, stride_ui, stride_dm, stride_di, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: BLOCK_M rows x BLOCK_I columns of g, u, dh -> the same tile of dg and du."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    g = tl.load(g_ptr + r * stride_gm + c * stride_gi, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_um + c * stride_ui, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(dh_ptr + r * stride_dm + c * stride_di, mask=mask, other=0.0).to(tl.float32)
    sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    dg = d * u * (sig * (1.0 + g * (1.0 - sig)))
    du = d * (g * sig)
    out = out_ptr + r * stride_om + c
    tl.store(out, dg.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + I, du.to(out_ptr.dtype.element_ty), mask=mask)


def _kernel():
    """jit the kernel on first use, after quant.build() has imported Triton (see quant.py)."""
    global _KERNEL, tl
    if _KERNEL is None:
        built = build()
        tl = built.tl
        _KERNEL = built.triton.jit(_swiglu_bwd_kernel)
    return _KERNEL


def swiglu_backward_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """[dg | du] ([M, 2I], dh's dtype); gate and up may be strided views (e.g. halves of one
    [M, 2I] GEMM output)."""
    _check(gate, up, dh)
    require_triton(gate, up, dh)
    m, i = gate.shape
    out = torch.empty(m, 2 * i, dtype=dh.dtype, device=dh.device)
    if m == 0 or i == 0:
        return out
    _kernel()[(cdiv(m, _BLOCK_M), cdiv(i, _BLOCK_I))](
        gate, up, dh, out, m, i, gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
        dh.stride(0), dh.stride(1), out.stride(0), BLOCK_M=_BLOCK_M, BLOCK_I=_BLOCK_I, num_warps=4)
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA, the torch reference elsewhere."""
    if HAVE_TRITON and gate.is_cuda and up.is_cuda and dh.is_cuda:
        return swiglu_backward_triton(gate, up, dh)
    return swiglu_backward_reference(gate, up, dh)
