"""SwiGLU h = silu(g) * u, forward and backward, each one pass over memory.

With dh the gradient of h:
    du = dh * silu(g)
    dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
Both are computed in float32 from g, u, dh and rounded once. The backward writes dg and du
into any two [M, I] outputs: side by side as one [M, 2I] tensor [dg | du] (the layout the
fused gate/up FP8 expert GEMM reads) or as two tensors (the bf16 path, whose gate and up
GEMMs take their gradients apart). Done with torch ops, forward and backward are about ten
passes over M x I temporaries (silu, the product, and autograd's saved silu(g)); the kernels
read g, u (and dh) once and write once.

`swiglu`, `swiglu_packed` (autograd, any leading dims) and `swiglu_backward` dispatch: Triton on CUDA, torch
elsewhere (tests run the kernels under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import torch

from .quant import _use_triton, jit_kernels, require_triton
from .reference import cdiv

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None
_BLOCK_M, _BLOCK_I = 16, 128


def swiglu_forward_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in the inputs' dtype, computed in float32."""
    _check(gate, up, up)
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(up.dtype)


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


def _tile(M, I, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: int64 row offsets [BLOCK_M, 1], columns [1, BLOCK_I], bounds mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    return rows.to(tl.int64)[:, None], cols[None, :], (rows[:, None] < M) & (cols[None, :] < I)


def _load_f32(ptr, r, c, stride_m, stride_i, mask):
    return tl.load(ptr + r * stride_m + c * stride_i, mask=mask, other=0.0).to(tl.float32)


def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, M, I, stride_gm, stride_gi, stride_um, stride_ui, stride_hm,
                       BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: BLOCK_M rows x BLOCK_I columns of g and u -> the same tile of h."""
    r, c, mask = _tile(M, I, BLOCK_M, BLOCK_I)
    g = _load_f32(g_ptr, r, c, stride_gm, stride_gi, mask)
    u = _load_f32(u_ptr, r, c, stride_um, stride_ui, mask)
    sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    tl.store(h_ptr + r * stride_hm + c, (g * sig * u).to(h_ptr.dtype.element_ty), mask=mask)


def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, M, I,
                       stride_gm, stride_gi, stride_um, stride_ui, stride_dm, stride_di,
                       stride_dgm, stride_dum, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: BLOCK_M rows x BLOCK_I columns of g, u, dh -> the same tile of dg and du."""
    r, c, mask = _tile(M, I, BLOCK_M, BLOCK_I)
    g = _load_f32(g_ptr, r, c, stride_gm, stride_gi, mask)
    u = _load_f32(u_ptr, r, c, stride_um, stride_ui, mask)
    d = _load_f32(dh_ptr, r, c, stride_dm, stride_di, mask)
    sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    dg = d * u * (sig * (1.0 + g * (1.0 - sig)))
    du = d * (g * sig)
    tl.store(dg_ptr + r * stride_dgm + c, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r * stride_dum + c, du.to(du_ptr.dtype.element_ty), mask=mask)


def _kernels():
    """jit the kernels on first use (quant.jit_kernels: Triton is imported only then)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), ("_tile", "_load_f32"), ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"))
    return _KERNELS


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u ([M, I], up's dtype); gate and up may be strided views."""
    _check(gate, up, up)
    require_triton(gate, up)
    m, i = gate.shape
    h = torch.empty(m, i, dtype=up.dtype, device=up.device)
    if m and i:
        _kernels()[0][(cdiv(m, _BLOCK_M), cdiv(i, _BLOCK_I))](
            gate, up, h, m, i, gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), h.stride(0),
            BLOCK_M=_BLOCK_M, BLOCK_I=_BLOCK_I, num_warps=4)
    return h


def swiglu_backward_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor,
                           split: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[dg | du] ([M, 2I], dh's dtype), or with split=True two contiguous [M, I] tensors
    (dg, du); gate and up may be strided views (e.g. halves of one [M, 2I] GEMM output)."""
    _check(gate, up, dh)
    require_triton(gate, up, dh)
    m, i = gate.shape
    if split:
        dg, du = torch.empty(m, i, dtype=dh.dtype, device=dh.device), torch.empty(m, i, dtype=dh.dtype, device=dh.device)
    else:
        out = torch.empty(m, 2 * i, dtype=dh.dtype, device=dh.device)
        dg, du = out[:, :i], out[:, i:]
    if m and i:
        _kernels()[1][(cdiv(m, _BLOCK_M), cdiv(i, _BLOCK_I))](
            gate, up, dh, dg, du, m, i, gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
            dh.stride(0), dh.stride(1), dg.stride(0), du.stride(0), BLOCK_M=_BLOCK_M, BLOCK_I=_BLOCK_I,
            num_warps=4)
    return (dg, du) if split else out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """[dg | du]: Triton on CUDA, the torch reference elsewhere."""
    if _use_triton(gate, up, dh):
        return swiglu_backward_triton(gate, up, dh)
    return swiglu_backward_reference(gate, up, dh)


class _SwiGLUFn(torch.autograd.Function):
    """silu(g) * u with the Triton kernels; saves g and u only (autograd's composition also
    keeps silu(g))."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward_triton(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_backward_triton(gate, up, dh.contiguous(), split=True)


class _PackedSwiGLUFn(torch.autograd.Function):
    """silu(g) * u from one [M, 2I] tensor [g | u] (one GEMM's output); its gradient comes back
    as one [M, 2I] tensor [dg | du], which the GEMM's backward reads as is (one input-gradient
    GEMM over 2I, no sum of two)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        i = gate_up.shape[1] // 2
        return swiglu_forward_triton(gate_up[:, :i], gate_up[:, i:])

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        i = gate_up.shape[1] // 2
        return swiglu_backward_triton(gate_up[:, :i], gate_up[:, i:], dh.contiguous())


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for gate_up = [g | u] along the last dim (any leading dims): the fused Triton
    passes on CUDA, the torch composition on the two halves elsewhere."""
    i = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * i:
        raise ValueError(f"swiglu_packed wants an even last dim [.., 2I], got {tuple(gate_up.shape)}")
    if not _use_triton(gate_up):
        return swiglu(gate_up[..., :i], gate_up[..., i:])
    lead = gate_up.shape[:-1]
    h = _PackedSwiGLUFn.apply(gate_up.reshape(-1, 2 * i))
    return h.view(*lead, i)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for training and inference, any leading dims: one fused Triton pass
    each way on CUDA; on CPU the plain torch composition (what the tests compare against)."""
    if not _use_triton(gate, up):
        return torch.nn.functional.silu(gate) * up
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    lead = gate.shape[:-1]
    h = _SwiGLUFn.apply(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
    return h.view(*lead, h.shape[-1])
