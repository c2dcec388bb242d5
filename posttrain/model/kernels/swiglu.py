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

With a per-row weight w (the MoE gate weight of the row's token and expert, applied before the
down projection), h = w * silu(g) * u, and backward also returns
    dw = sum over the row of dh * silu(g) * u
with dg, du computed from w * dh; the weighted backward walks whole rows for that sum.

`swiglu`, `swiglu_packed` (autograd, any leading dims) and `swiglu_backward` dispatch: Triton on CUDA, torch
elsewhere (tests run the kernels under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import torch

from .quant import _use_triton, interpreting, jit_kernels, require_triton
from . import reference
from .reference import cdiv

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None
# Rows x columns per program, and warps. benchmarks/tune_swiglu.py on an H100 at [98304, 2x1408]:
# every tile within 4% (2.8-2.95 TB/s); 4 x 512 the fastest both ways, plain and weighted.
_BLOCK_M, _BLOCK_I, _NUM_WARPS = 4, 512, 4
# Under the interpreter: narrow, so the tests' rows span several chunks of the weighted
# backward's loop (its row sums carry across chunks).
_INTERPRET_TILE = (8, 64, 1)


def _tile_config() -> tuple[int, int, int]:
    return _INTERPRET_TILE if interpreting() else (_BLOCK_M, _BLOCK_I, _NUM_WARPS)


def swiglu_forward_reference(gate: torch.Tensor, up: torch.Tensor, row_w: torch.Tensor | None = None) -> torch.Tensor:
    """(row_w *) silu(g) * u in the inputs' dtype, computed in float32."""
    _check(gate, up, up, row_w)
    return reference.swiglu(gate, up, row_w).to(up.dtype)


def swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor,
                              row_w: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[dg | du] in dh's dtype, computed in float32; with row_w, ([dg | du], drow_w float32)."""
    _check(gate, up, dh, row_w)
    g = gate.float()
    sig = torch.sigmoid(g)
    d = dh.float()
    if row_w is not None:
        drow_w = (d * (g * sig * up.float())).sum(-1)
        d = d * row_w[:, None]
    dg = d * up.float() * (sig * (1.0 + g * (1.0 - sig)))
    du = d * (g * sig)
    dgu = torch.cat([dg, du], dim=-1).to(dh.dtype)
    return dgu if row_w is None else (dgu, drow_w)


def _check(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, row_w: torch.Tensor | None = None) -> None:
    if gate.dim() != 2 or gate.shape != up.shape or gate.shape != dh.shape:
        raise ValueError(f"gate, up and dh must share one [M, I] shape, got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)} and {tuple(dh.shape)}")
    if row_w is not None and (row_w.shape != gate.shape[:1] or row_w.dtype != torch.float32):
        raise ValueError(f"row weights must be float32 [{gate.shape[0]}], got {row_w.dtype} {tuple(row_w.shape)}")


def _tile(M, I, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: int64 row offsets [BLOCK_M, 1], columns [1, BLOCK_I], bounds mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    return rows.to(tl.int64)[:, None], cols[None, :], (rows[:, None] < M) & (cols[None, :] < I)


def _load_f32(ptr, r, c, stride_m, stride_i, mask):
    return tl.load(ptr + r * stride_m + c * stride_i, mask=mask, other=0.0).to(tl.float32)


def _swiglu_fwd_kernel(g_ptr, u_ptr, w_ptr, h_ptr, M, I, stride_gm, stride_gi, stride_um, stride_ui, stride_hm,
                       HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: BLOCK_M rows x BLOCK_I columns of g and u -> the same tile of h."""
    r, c, mask = _tile(M, I, BLOCK_M, BLOCK_I)
    g = _load_f32(g_ptr, r, c, stride_gm, stride_gi, mask)
    u = _load_f32(u_ptr, r, c, stride_um, stride_ui, mask)
    sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    h = g * sig * u
    if HAS_W:
        h = h * tl.load(w_ptr + r, mask=r < M, other=0.0)
    tl.store(h_ptr + r * stride_hm + c, h.to(h_ptr.dtype.element_ty), mask=mask)


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


def _swiglu_bwd_weighted_kernel(g_ptr, u_ptr, dh_ptr, w_ptr, dg_ptr, du_ptr, dw_ptr, M, I,
                                stride_gm, stride_gi, stride_um, stride_ui, stride_dm, stride_di,
                                stride_dgm, stride_dum, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: BLOCK_M whole rows, BLOCK_I columns at a time (dw sums over the row)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        c = i0 + tl.arange(0, BLOCK_I)[None, :]
        mask = row_ok[:, None] & (c < I)
        g = _load_f32(g_ptr, r, c, stride_gm, stride_gi, mask)
        u = _load_f32(u_ptr, r, c, stride_um, stride_ui, mask)
        d = _load_f32(dh_ptr, r, c, stride_dm, stride_di, mask)
        sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
        silu = g * sig
        dot += tl.sum(d * (silu * u), 1)
        d = d * w
        tl.store(dg_ptr + r * stride_dgm + c, (d * u * (sig * (1.0 + g * (1.0 - sig)))).to(dg_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(du_ptr + r * stride_dum + c, (d * silu).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + rows, dot, mask=row_ok)


def _kernels():
    """jit the kernels on first use (quant.jit_kernels: Triton is imported only then)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), ("_tile", "_load_f32"),
                               ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_swiglu_bwd_weighted_kernel"))
    return _KERNELS


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor, row_w: torch.Tensor | None = None) -> torch.Tensor:
    """h = (row_w *) silu(g) * u ([M, I], up's dtype); gate and up may be strided views."""
    _check(gate, up, up, row_w)
    require_triton(gate, up)
    m, i = gate.shape
    h = torch.empty(m, i, dtype=up.dtype, device=up.device)
    if m and i:
        bm, bi, warps = _tile_config()
        _kernels()[0][(cdiv(m, bm), cdiv(i, bi))](
            gate, up, row_w if row_w is not None else h, h, m, i, gate.stride(0), gate.stride(1), up.stride(0),
            up.stride(1), h.stride(0), HAS_W=row_w is not None, BLOCK_M=bm, BLOCK_I=bi, num_warps=warps)
    return h


def swiglu_backward_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, split: bool = False,
                           row_w: torch.Tensor | None = None):
    """[dg | du] ([M, 2I], dh's dtype), or with split=True two contiguous [M, I] tensors
    (dg, du); gate and up may be strided views (e.g. halves of one [M, 2I] GEMM output). With
    row_w, the row weights' gradient (float32 [M]) comes last: ([dg | du], drow_w) or (dg, du, drow_w)."""
    _check(gate, up, dh, row_w)
    require_triton(gate, up, dh)
    m, i = gate.shape
    if split:
        dg, du = torch.empty(m, i, dtype=dh.dtype, device=dh.device), torch.empty(m, i, dtype=dh.dtype, device=dh.device)
    else:
        out = torch.empty(m, 2 * i, dtype=dh.dtype, device=dh.device)
        dg, du = out[:, :i], out[:, i:]
    strides = (gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), dh.stride(0), dh.stride(1),
               dg.stride(0), du.stride(0))
    grads = (dg, du) if split else (out,)
    bm, bi, warps = _tile_config()
    if row_w is None:
        if m and i:
            _kernels()[1][(cdiv(m, bm), cdiv(i, bi))](
                gate, up, dh, dg, du, m, i, *strides, BLOCK_M=bm, BLOCK_I=bi, num_warps=warps)
        return grads if split else out
    drow_w = torch.zeros(m, dtype=torch.float32, device=dh.device)
    if m and i:
        _kernels()[2][(cdiv(m, bm),)](
            gate, up, dh, row_w, dg, du, drow_w, m, i, *strides, BLOCK_M=bm, BLOCK_I=bi, num_warps=warps)
    return (*grads, drow_w)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, row_w: torch.Tensor | None = None):
    """[dg | du], or ([dg | du], drow_w) with row weights: Triton on CUDA, the torch reference elsewhere."""
    if _use_triton(gate, up, dh):
        return swiglu_backward_triton(gate, up, dh, row_w=row_w)
    return swiglu_backward_reference(gate, up, dh, row_w)


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
    """(row_w *) silu(g) * u from one [M, 2I] tensor [g | u] (one GEMM's output); its gradient
    comes back as one [M, 2I] tensor [dg | du], which the GEMM's backward reads as is (one
    input-gradient GEMM over 2I, no sum of two)."""

    @staticmethod
    def forward(ctx, gate_up, row_w):
        ctx.save_for_backward(gate_up, row_w)
        i = gate_up.shape[1] // 2
        return swiglu_forward_triton(gate_up[:, :i], gate_up[:, i:], row_w)

    @staticmethod
    def backward(ctx, dh):
        gate_up, row_w = ctx.saved_tensors
        i = gate_up.shape[1] // 2
        if row_w is None:
            return swiglu_backward_triton(gate_up[:, :i], gate_up[:, i:], dh.contiguous()), None
        dgu, drow_w = swiglu_backward_triton(gate_up[:, :i], gate_up[:, i:], dh.contiguous(), row_w=row_w)
        return dgu, drow_w if ctx.needs_input_grad[1] else None


def swiglu_packed(gate_up: torch.Tensor, row_w: torch.Tensor | None = None) -> torch.Tensor:
    """silu(g) * u for gate_up = [g | u] along the last dim (any leading dims), each row times
    row_w (float32 [rows], 2-D gate_up only) when given: the fused Triton passes on CUDA, the
    torch composition elsewhere."""
    i = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * i:
        raise ValueError(f"swiglu_packed wants an even last dim [.., 2I], got {tuple(gate_up.shape)}")
    if row_w is not None and (gate_up.dim() != 2 or row_w.shape != gate_up.shape[:1]):
        raise ValueError(f"row weights need a 2-D [M, 2I] input and [M] weights, got {tuple(gate_up.shape)} "
                         f"and {tuple(row_w.shape)}")
    if not _use_triton(gate_up):
        if row_w is None:
            return swiglu(gate_up[..., :i], gate_up[..., i:])
        return swiglu_forward_reference(gate_up[:, :i], gate_up[:, i:], row_w)
    lead = gate_up.shape[:-1]
    h = _PackedSwiGLUFn.apply(gate_up.reshape(-1, 2 * i), row_w)
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
