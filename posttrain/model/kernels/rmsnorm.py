"""RMSNorm y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), forward and backward in
one pass each.

The rounding matches `layers.RMSNorm` (the reference's order): x * rstd is computed in float32
and rounded to x's dtype before the weight multiplies, and the output takes the promoted dtype
of w and x. The backward works in float32 from x, w, rstd and dy:
    n  = round(x * rstd)                    (what the weight saw)
    dw = sum over rows of dy * n
    dn = dy * w
    dx = rstd * dn - x * rstd^3 * mean(dn * x)
Done with torch ops the norm is about six kernels forward and a dozen backward, each a pass over
[rows, dim] float32 temporaries; the blocks call it three times per layer (input, post-attention,
KV latent), so on the GPU it costs more than the attention core. The kernels read x (and dy)
once and write once; dw is summed per program in float32 and reduced over programs by torch.

`rms_norm` (autograd, any leading dims) dispatches: Triton on CUDA, torch elsewhere (the tests
run the kernels under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import torch

from .quant import _use_triton, jit_kernels, require_triton
from .reference import cdiv

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None
# Programs of the backward (each keeps one float32 partial row of dw); enough to fill an H100.
_BWD_PROGRAMS = 264


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch composition `layers.RMSNorm` runs on CPU (autograd through it is the reference
    backward)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rows(M, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, N, start):
    """Row offsets (int64) [ROWS, 1], columns [1, BLOCK_N] and the bounds mask of a tile."""
    rows = start + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    return rows.to(tl.int64)[:, None], cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)


def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_xm, stride_ym, eps,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: ROWS whole rows -> y and rstd."""
    r, c, mask = _rows(M, ROWS, BLOCK_N, N, tl.program_id(0) * ROWS)
    x = tl.load(x_ptr + r * stride_xm + c, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_ym + c, (n * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r, rstd[:, None], mask=r < M)


def _rmsnorm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, N, rows_per_program,
                        stride_xm, stride_dym, stride_dxm, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: a contiguous run of rows_per_program rows (ROWS at a time) -> their dx, and
    their share of dw as one float32 row of dw_part."""
    pid = tl.program_id(0)
    first = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(first, tl.minimum(first + rows_per_program, M), ROWS):
        r, c, mask = _rows(tl.minimum(first + rows_per_program, M), ROWS, BLOCK_N, N, start)
        x = tl.load(x_ptr + r * stride_xm + c, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * stride_dym + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < M, other=0.0)  # [ROWS, 1]
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        dw += tl.sum(dy * n, axis=0)
        dn = dy * w
        dx = rstd * dn - x * (rstd * rstd * rstd) * (tl.sum(dn * x, axis=1)[:, None] / N)
        tl.store(dx_ptr + r * stride_dxm + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + cols, dw, mask=cols < N)


def _kernels():
    """jit the kernels on first use (quant.jit_kernels: Triton is imported only then)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), ("_rows",), ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"))
    return _KERNELS


def _tile_rows(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps): whole rows per program, about 8K elements per tile."""
    block_n = 1 << max(n - 1, 0).bit_length()
    rows = max(1, min(16, 8192 // block_n))
    return block_n, rows, 8 if block_n * rows >= 4096 else 4


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 1 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"rms_norm wants x [M, N] and weight [N], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(1) != 1:
        raise ValueError("rms_norm's x must be contiguous along its last dim")


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] in the promoted dtype of weight and x, rstd [M] float32)."""
    _check(x, weight)
    require_triton(x, weight)
    m, n = x.shape
    y = torch.empty(m, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m and n:
        block_n, rows, warps = _tile_rows(n)
        _kernels()[0][(cdiv(m, rows),)](x, weight, y, rstd, m, n, x.stride(0), y.stride(0), eps,
                                        ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    return y, rstd


def rms_norm_backward_triton(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                             dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in weight's dtype)."""
    _check(x, weight)
    _check(dy, weight)
    require_triton(x, weight, dy)
    m, n = x.shape
    dx = torch.empty_like(x)
    if not (m and n):
        return dx, torch.zeros_like(weight)
    block_n, rows, warps = _tile_rows(n)
    programs = min(_BWD_PROGRAMS, cdiv(m, rows))
    per_program = cdiv(cdiv(m, programs), rows) * rows
    programs = cdiv(m, per_program)
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    _kernels()[1][(programs,)](x, weight, dy, rstd, dx, dw_part, m, n, per_program,
                               x.stride(0), dy.stride(0), dx.stride(0), ROWS=rows, BLOCK_N=block_n,
                               num_warps=warps)
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with the Triton kernels; saves x and rstd (autograd's composition keeps float32
    copies of x and the normalised x)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward_triton(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward_triton(x, weight, rstd, dy.contiguous())
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim for training and inference, any leading dims: one Triton pass
    each way on CUDA; on CPU the torch composition (what the tests compare against)."""
    if not _use_triton(x, weight):
        return rms_norm_reference(x, weight, eps)
    lead = x.shape[:-1]
    y = _RMSNormFn.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps)
    return y.view(*lead, y.shape[-1])
