"""Token dispatch to, and weighted combine from, the expert-sorted row buffer of a MoE layer.

Every token n was routed to K experts; slot (n, k) owns row rows[n, k] of a buffer whose rows
are grouped by expert (any layout: plain sorted, or padded so each expert starts on a multiple
of 128). No two slots share a row; rows owned by no slot (padding) are zero in what is written.

    dispatch          buf[rows[n, k]] = x[n]   (and, given w, row_w[rows[n, k]] = w[n, k])
    dispatch backward dx[n] = sum_k dbuf[rows[n, k]]   (float32 sum; given drow_w, also
                      dw[n, k] = drow_w[rows[n, k]])
    combine           out[n] = sum_k w[n, k] * y[rows[n, k]] (+ residual[n]) (float32 sum)
    combine backward  dy[rows[n, k]] = w[n, k] * dout[n],  dw[n, k] = <dout[n], y[rows[n, k]]>

Without w the combine is a plain sum (the gate weights were applied to the rows before the
down projection, see moe.py) and its backward is the dispatch of dout.

Each op is one pass of one program per token, reading and writing every row once: torch's
version (gather the K copies, upcast the [N, K, D] block to float32, multiply, reduce; and the
same again in backward) moves several times the bytes. Nothing is accumulated with atomics, so
results are the same run to run, as the reductions over a fixed axis in the torch version are.

`dispatch`, `dispatch_backward`, `combine`, `combine_backward`: Triton on CUDA, the torch
references elsewhere; the `*_triton` functions also run on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch

from .quant import HAVE_TRITON
from .reference import cdiv

tl = None  # triton.language once `_kernels()` has run
_KERNELS = None
_INTERPRET_BLOCK_D = 32  # small under the interpreter so the tests cover several chunks and a tail


# ----------------------------------------------------------------------------- references


def _check(rows_NK: torch.Tensor, n: int | None = None) -> None:
    if rows_NK.dim() != 2 or (n is not None and rows_NK.shape[0] != n):
        raise ValueError(f"rows must be [N, K] with N = {n} tokens, got {tuple(rows_NK.shape)}")
    if rows_NK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32 or int64, got {rows_NK.dtype}")


def _covers_all(rows_NK: torch.Tensor, num_rows: int) -> bool:
    """Whether every buffer row belongs to a slot (rows are distinct, so: as many slots as rows)."""
    return rows_NK.numel() == num_rows


def dispatch_reference(x_ND: torch.Tensor, rows_NK: torch.Tensor, num_rows: int) -> torch.Tensor:
    _check(rows_NK, x_ND.shape[0])
    N, K = rows_NK.shape
    buf = x_ND.new_zeros(num_rows, x_ND.shape[1])
    buf[rows_NK.reshape(-1)] = x_ND[:, None].expand(N, K, x_ND.shape[1]).reshape(N * K, -1)
    return buf


def row_weights_reference(w_NK: torch.Tensor, rows_NK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """row_w [num_rows] float32: w[n, k] at rows[n, k], zero on rows no slot owns."""
    _check(rows_NK, w_NK.shape[0])
    row_w = torch.zeros(num_rows, dtype=torch.float32, device=w_NK.device)
    row_w[rows_NK.reshape(-1)] = w_NK.reshape(-1).float()
    return row_w


def dispatch_backward_reference(dbuf_MD: torch.Tensor, rows_NK: torch.Tensor) -> torch.Tensor:
    _check(rows_NK)
    return dbuf_MD[rows_NK].float().sum(1).to(dbuf_MD.dtype)


def combine_reference(y_MD: torch.Tensor, rows_NK: torch.Tensor, w_NK: torch.Tensor | None,
                      residual_ND: torch.Tensor | None = None) -> torch.Tensor:
    _check(rows_NK, w_NK.shape[0] if w_NK is not None else None)
    picked = y_MD[rows_NK].float()
    out = (picked * w_NK[..., None].float() if w_NK is not None else picked).sum(1)
    if residual_ND is not None:
        out = out + residual_ND.float()
    return out.to(y_MD.dtype)


def combine_backward_reference(dout_ND: torch.Tensor, y_MD: torch.Tensor, rows_NK: torch.Tensor,
                               w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [M, D] in y's dtype, zero on rows no slot owns; dw [N, K] float32)."""
    _check(rows_NK, dout_ND.shape[0])
    d = dout_ND.float()
    dy = y_MD.new_zeros(y_MD.shape)
    dy[rows_NK.reshape(-1)] = (w_NK[..., None].float() * d[:, None]).reshape(-1, y_MD.shape[1]).to(y_MD.dtype)
    dw = (y_MD[rows_NK].float() * d[:, None]).sum(-1)
    return dy, dw


# ----------------------------------------------------------------------------- Triton


def _dispatch_kernel(x_ptr, rows_ptr, out_ptr, w_ptr, row_w_ptr, D, stride_x, stride_o,
                     HAS_W: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    rows = tl.load(rows_ptr + n * K + ks, mask=k_ok, other=0).to(tl.int64)
    if HAS_W:
        tl.store(row_w_ptr + rows, tl.load(w_ptr + n * K + ks, mask=k_ok, other=0.0).to(tl.float32), mask=k_ok)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        v = tl.load(x_ptr + n * stride_x + d, mask=d_ok, other=0.0)
        tile = tl.zeros((K_PAD, BLOCK_D), dtype=v.dtype) + v[None, :]
        tl.store(out_ptr + rows[:, None] * stride_o + d[None, :], tile, mask=k_ok[:, None] & d_ok[None, :])


def _gather_sum_kernel(buf_ptr, rows_ptr, w_ptr, res_ptr, out_ptr, drow_w_ptr, dw_ptr, D, stride_b, stride_r,
                       stride_o, WEIGHTED: tl.constexpr, HAS_RES: tl.constexpr, GATHER_W: tl.constexpr,
                       K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = (res[n] +) sum_k (w[n, k] *) buf[rows[n, k]] in float32: the combine (with the
    shared experts' output added in the same pass), and the dispatch's backward (GATHER_W: with
    the row weights' gradient gathered back to dw[n, k])."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    rows = tl.load(rows_ptr + n * K + ks, mask=k_ok, other=0).to(tl.int64)
    if GATHER_W:
        tl.store(dw_ptr + n * K + ks, tl.load(drow_w_ptr + rows, mask=k_ok, other=0.0), mask=k_ok)
    if WEIGHTED:
        w = tl.load(w_ptr + n * K + ks, mask=k_ok, other=0.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(buf_ptr + rows[:, None] * stride_b + d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        if WEIGHTED:
            g = g * w[:, None]
        acc = tl.sum(g, 0)
        if HAS_RES:
            acc += tl.load(res_ptr + n * stride_r + d, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_o + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _combine_backward_kernel(dout_ptr, y_ptr, rows_ptr, w_ptr, dy_ptr, dw_ptr, D,
                             stride_do, stride_y, stride_dy,
                             K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    rows = tl.load(rows_ptr + n * K + ks, mask=k_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + n * K + ks, mask=k_ok, other=0.0).to(tl.float32)
    dot = tl.zeros((K_PAD,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        m = k_ok[:, None] & d_ok[None, :]
        g = tl.load(dout_ptr + n * stride_do + d, mask=d_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_y + d[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(y * g[None, :], 1)
        tl.store(dy_ptr + rows[:, None] * stride_dy + d[None, :],
                 (w[:, None] * g[None, :]).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + n * K + ks, dot, mask=k_ok)


def _zero_pad_rows_kernel(buf_ptr, row_w_ptr, counts_ptr, offsets_ptr, num_rows, D, stride_b,
                          HAS_W: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Zero the rows of BLOCK_R consecutive rows that no slot owns: an expert's rows past its
    count (up to its padded end), and rows past the last end."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    es = tl.arange(0, E_PAD)
    ends = tl.load(offsets_ptr + es, mask=es < E, other=0)
    # row r lies in the range of the first expert whose end is above it (E: past every end)
    e = tl.sum(((ends[None, :] <= r[:, None]) & (es[None, :] < E)).to(tl.int32), 1)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    count = tl.load(counts_ptr + e, mask=e < E, other=0)
    pad = (r < num_rows) & (r - start >= count)
    if HAS_W:
        tl.store(row_w_ptr + r, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=pad)
    zeros = tl.zeros((BLOCK_R, BLOCK_D), dtype=buf_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(buf_ptr + r.to(tl.int64)[:, None] * stride_b + d[None, :], zeros, mask=pad[:, None] & (d[None, :] < D))


def _kernels():
    global _KERNELS, tl
    if _KERNELS is None:
        try:
            import triton
            import triton.language as triton_language
        except ImportError as exc:
            raise RuntimeError("the dispatch/combine kernels need triton; use the *_reference functions") from exc
        tl = triton_language
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        _KERNELS = (interpret, triton.jit(_dispatch_kernel), triton.jit(_gather_sum_kernel),
                    triton.jit(_combine_backward_kernel), triton.jit(_zero_pad_rows_kernel))
    return _KERNELS


def _meta(rows_NK: torch.Tensor, D: int, interpret: bool) -> dict:
    K = rows_NK.shape[1]
    block_d = _INTERPRET_BLOCK_D if interpret else min(1024, max(64, 1 << (D - 1).bit_length()))
    # 4 warps per [K_PAD, 1024] tile: with 8 the sum over K crosses warps (shared memory and a
    # barrier per chunk) and the gather-sums ran at half the speed (H100, 8192 x 6 rows of 2048:
    # 166 -> 89 us; benchmarks/tune_permute.py).
    return dict(K=K, K_PAD=max(2, 1 << (K - 1).bit_length()), BLOCK_D=block_d,
                num_warps=1 if interpret else 4)


def _rows_c(rows_NK: torch.Tensor) -> torch.Tensor:
    return rows_NK.contiguous()


def _use_triton(*tensors: torch.Tensor) -> bool:
    return HAVE_TRITON and all(t.is_cuda for t in tensors)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def padding_rows_reference(num_rows: int, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """[num_rows] bool: the rows of a padded layout that no slot owns (each expert's rows past
    its count up to its padded end, and the rows past the last end)."""
    r = torch.arange(num_rows, device=offsets_E.device)
    ends = offsets_E.long()
    e = torch.searchsorted(ends, r, right=True)
    start = torch.where(e > 0, ends[(e - 1).clamp(min=0)], torch.zeros_like(r))
    count = torch.where(e < ends.numel(), counts_E.long()[e.clamp(max=ends.numel() - 1)], torch.zeros_like(r))
    return r - start >= count


def _zero_pad_rows(buf: torch.Tensor, row_w: torch.Tensor | None, pad: tuple[torch.Tensor, torch.Tensor],
                   interpret: bool) -> None:
    counts, offsets = pad
    E = offsets.shape[0]
    num_rows, D = buf.shape
    block_r, block_d = (4, 32) if interpret else (16, 256)
    if num_rows and E:
        _kernels()[4][(cdiv(num_rows, block_r),)](
            buf, row_w if row_w is not None else buf, counts.contiguous(), offsets.contiguous(), num_rows, D,
            buf.stride(0), HAS_W=row_w is not None, E=E, E_PAD=max(2, 1 << (E - 1).bit_length()), BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=1 if interpret else 4)
    elif num_rows:
        buf.zero_()
        if row_w is not None:
            row_w.zero_()


def dispatch_triton(x_ND: torch.Tensor, rows_NK: torch.Tensor, num_rows: int, w_NK: torch.Tensor | None = None,
                    pad: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """buf, or (buf, row_w) given w_NK (see `dispatch`)."""
    _check(rows_NK, x_ND.shape[0])
    interpret, kernel, _, _, _ = _kernels()
    N, D = x_ND.shape
    x_ND, rows = _row_major(x_ND), _rows_c(rows_NK)
    # Rows no slot owns must be zero. Given the layout (pad), only those rows are written;
    # otherwise the whole buffer is zeroed first.
    covered = _covers_all(rows_NK, num_rows)
    alloc = torch.empty if covered or pad is not None else torch.zeros
    buf = alloc(num_rows, D, dtype=x_ND.dtype, device=x_ND.device)
    row_w = None
    if w_NK is not None:
        _check(rows_NK, w_NK.shape[0])
        row_w = alloc(num_rows, dtype=torch.float32, device=x_ND.device)
    if N and rows.shape[1]:
        w = w_NK.contiguous() if w_NK is not None else rows
        kernel[(N,)](x_ND, rows, buf, w, row_w if row_w is not None else buf, D, x_ND.stride(0), buf.stride(0),
                     HAS_W=w_NK is not None, **_meta(rows, D, interpret))
    if pad is not None and not covered:
        _zero_pad_rows(buf, row_w, pad, interpret)
    return buf if w_NK is None else (buf, row_w)


def _gather_sum(buf: torch.Tensor, rows_NK: torch.Tensor, w_NK: torch.Tensor | None,
                residual_ND: torch.Tensor | None = None,
                drow_w: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    interpret, _, kernel, _, _ = _kernels()
    N = rows_NK.shape[0]
    D = buf.shape[1]
    buf, rows = _row_major(buf), _rows_c(rows_NK)
    if residual_ND is not None:
        if residual_ND.shape != (N, D):
            raise ValueError(f"residual must be [{N}, {D}], got {tuple(residual_ND.shape)}")
        residual_ND = _row_major(residual_ND)
    out = torch.empty(N, D, dtype=buf.dtype, device=buf.device)
    dw = None
    if drow_w is not None:
        if drow_w.shape != (buf.shape[0],):
            raise ValueError(f"drow_w must be [{buf.shape[0]}], got {tuple(drow_w.shape)}")
        dw = torch.empty(rows.shape, dtype=torch.float32, device=buf.device)
    if N:
        w = w_NK.contiguous() if w_NK is not None else rows
        res = residual_ND if residual_ND is not None else buf
        drw = drow_w.float().contiguous() if drow_w is not None else buf
        kernel[(N,)](buf, rows, w, res, out, drw, dw if dw is not None else buf, D, buf.stride(0), res.stride(0),
                     out.stride(0), WEIGHTED=w_NK is not None, HAS_RES=residual_ND is not None,
                     GATHER_W=drow_w is not None, **_meta(rows, D, interpret))
    return out if drow_w is None else (out, dw)


def dispatch_backward_triton(dbuf_MD: torch.Tensor, rows_NK: torch.Tensor,
                             drow_w: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    _check(rows_NK)
    return _gather_sum(dbuf_MD, rows_NK, None, drow_w=drow_w)


def combine_triton(y_MD: torch.Tensor, rows_NK: torch.Tensor, w_NK: torch.Tensor | None,
                   residual_ND: torch.Tensor | None = None) -> torch.Tensor:
    _check(rows_NK, w_NK.shape[0] if w_NK is not None else None)
    return _gather_sum(y_MD, rows_NK, w_NK, residual_ND)


def combine_backward_triton(dout_ND: torch.Tensor, y_MD: torch.Tensor, rows_NK: torch.Tensor,
                            w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(rows_NK, dout_ND.shape[0])
    interpret, _, _, kernel, _ = _kernels()
    N, D = dout_ND.shape
    dout_ND, y_MD, rows = _row_major(dout_ND), _row_major(y_MD), _rows_c(rows_NK)
    alloc = torch.empty if _covers_all(rows_NK, y_MD.shape[0]) else torch.zeros
    dy = alloc(y_MD.shape, dtype=y_MD.dtype, device=y_MD.device)
    dw = torch.empty(rows.shape, dtype=torch.float32, device=y_MD.device)
    if N and D and rows.shape[1]:
        kernel[(N,)](dout_ND, y_MD, rows, w_NK.contiguous(), dy, dw, D,
                     dout_ND.stride(0), y_MD.stride(0), dy.stride(0), **_meta(rows, D, interpret))
    elif N:
        dw.zero_()
    return dy, dw


# ----------------------------------------------------------------------------- dispatch


def dispatch(x_ND: torch.Tensor, rows_NK: torch.Tensor, num_rows: int, w_NK: torch.Tensor | None = None,
             pad: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """buf [num_rows, D]: buf[rows[n, k]] = x[n], zero on rows no slot owns. Given w_NK, returns
    (buf, row_w) with row_w [num_rows] float32 = w[n, k] at rows[n, k] (zero elsewhere), in the
    same pass. pad = (counts [E], offsets [E]) of a padded layout (`SlotLayout`) lets the kernel
    zero just the rows no slot owns instead of the whole buffer."""
    if _use_triton(x_ND, rows_NK):
        return dispatch_triton(x_ND, rows_NK, num_rows, w_NK, pad)
    buf = dispatch_reference(x_ND, rows_NK, num_rows)
    return buf if w_NK is None else (buf, row_weights_reference(w_NK, rows_NK, num_rows))


def dispatch_backward(dbuf_MD: torch.Tensor, rows_NK: torch.Tensor,
                      drow_w: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """dx [N, D]: sum over k of dbuf[rows[n, k]], accumulated in float32. Given drow_w (the
    gradient of dispatch's row_w), returns (dx, dw [N, K] float32 = drow_w[rows])."""
    if _use_triton(dbuf_MD, rows_NK):
        return dispatch_backward_triton(dbuf_MD, rows_NK, drow_w)
    dx = dispatch_backward_reference(dbuf_MD, rows_NK)
    return dx if drow_w is None else (dx, drow_w.float()[rows_NK])


def combine(y_MD: torch.Tensor, rows_NK: torch.Tensor, w_NK: torch.Tensor | None,
            residual_ND: torch.Tensor | None = None) -> torch.Tensor:
    """out [N, D] in y's dtype: (residual[n] +) sum over k of w[n, k] * y[rows[n, k]] (w_NK None:
    a plain sum), accumulated in float32 and rounded once."""
    if _use_triton(y_MD, rows_NK):
        return combine_triton(y_MD, rows_NK, w_NK, residual_ND)
    return combine_reference(y_MD, rows_NK, w_NK, residual_ND)


def combine_backward(dout_ND: torch.Tensor, y_MD: torch.Tensor, rows_NK: torch.Tensor,
                     w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [M, D] in y's dtype, zero on rows no slot owns; dw [N, K] float32)."""
    if _use_triton(dout_ND, y_MD, rows_NK, w_NK):
        return combine_backward_triton(dout_ND, y_MD, rows_NK, w_NK)
    return combine_backward_reference(dout_ND, y_MD, rows_NK, w_NK)
