"""Grouped (per-expert) GEMMs in Triton, bf16 and blockwise FP8, with plain torch references.

Layout, as the MoE layer uses it: the rows of x [M, K] are sorted by expert and `offsets`
(int [E]) holds the cumulative row ends, so expert e owns rows offsets[e-1]..offsets[e]
(expert 0 starts at row 0); an expert may own no rows. Expert weights are stacked in nn.Linear layout
w [E, N, K] (out, in), and the rows of expert e come out as x_e @ w[e].T. Every weight argument
may be a strided view (e.g. w.transpose(1, 2) for the input gradient dy @ w[e]): strides are
passed to the kernels, nothing is copied.

FP8 follows posttrain.model.fp8: float8_e4m3fn (max 448) and float32 scales that are DEQUANT
multipliers (x ~ q.float() * s). Activations are quantised in 1x128 tiles along K
(xq [M, K], xs [M, ceil(K/128)]), weights in 128x128 blocks per expert (wq [E, N, K],
ws [E, ceil(N/128), ceil(K/128)]). The kernels promote every 128-wide K block into a float32
accumulator: acc += dot(q_a, q_b) * s_a[:, None] * s_b[None, :].

Tile schedule (forward kernels, no host sync): the grid along M is the upper bound
ceil(M / BLOCK_M) + E. Each program loads the E offsets, computes tiles per expert
ceil(count_e / BLOCK_M) and their cumulative sum, and finds its expert as the number of
cumulative tile ends <= its program id; programs past the last tile return at once. The rows
past offsets[-1] form one more pseudo-expert whose tiles are written as zeros, so the whole
output is defined (sum over E + 1 segments of ceil(count / BLOCK_M) <= ceil(M / BLOCK_M) + E,
so the bound still holds). The weight-gradient kernels run one program per
(expert, N tile, K tile) and reduce over that expert's rows with a loop of run-time length.

Triton is imported on first use (this module imports without it), and the kernels are built
then: with TRITON_INTERPRET=1 (which must be set before triton is first imported anywhere in
the process) they run on CPU tensors under Triton's interpreter with the small fixed tiles of
`_INTERPRET_META`, and 16-bit operands are upcast to float32 before tl.dot because the
interpreter's dot multiplies bf16 bit patterns as integers (exact: products of bf16 values are
exact in float32); otherwise they are autotuned for Hopper and need CUDA tensors.

Index arithmetic over rows (and over anything multiplied by an M-sized stride) is int64; one
expert's weight matrix must span fewer than 2**31 elements.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import selection

from .grouped_reference import (QBLOCK, PaddedLayout, check_fp8_wgrad_offsets,  # noqa: F401 (re-exported)
                                grouped_gemm_fp8_reference, grouped_gemm_reference,
                                grouped_gemm_wgrad_fp8_reference, grouped_gemm_wgrad_reference,
                                pad_offsets_to)


FP8_DTYPE = torch.float8_e4m3fn

tl = None  # triton.language once `_kernels()` has run; the kernel bodies below refer to it

# Tile sizes under TRITON_INTERPRET=1 (small, so CPU tests exercise many tiles and tails).
# Tests may change these; the FP8 kernels always use 128 along their reduction dimension.
_INTERPRET_META = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "fwd_fp8": dict(BLOCK_M=16, BLOCK_N=32),
    "wgrad": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "wgrad_fp8": dict(BLOCK_N=32, BLOCK_K=32),
}


# --------------------------------------------------------------------------------------------
# Triton kernels (plain functions here; `_kernels()` jits them on first use)
# --------------------------------------------------------------------------------------------


def _expert_tile(offs_ptr, pid_m, M, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (expert, first row, expert's row end, total tiles) from the offsets.

    Segment e < E is expert e; segment E is the rows past offsets[-1] (written as zeros).
    """
    e = tl.arange(0, E_PAD)
    ends = tl.load(offs_ptr + e, mask=e < E, other=0)
    ends = tl.minimum(tl.where(e == E, M, ends), M)
    starts = tl.minimum(tl.load(offs_ptr + e - 1, mask=(e > 0) & (e <= E), other=0), M)
    tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, 0)  # inclusive: tiles of segments 0..e
    total = tl.sum(tiles, 0)
    ex = tl.sum((last <= pid_m).to(tl.int32), 0)
    sel = e == ex
    first_tile = tl.sum(tl.where(sel, last - tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return ex, row0, row_end, total


def _grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, offs_ptr, M, N, K, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    E_PAD: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ex, row0, row_end, total = _expert_tile(offs_ptr, pid_m, M, E, E_PAD, BLOCK_M)
    if pid_m >= total:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + tl.minimum(ex, E - 1).to(tl.int64) * stride_we + cols[None, :] * stride_wn
    k_end = tl.where(ex < E, K, 0)  # the pseudo-expert E only writes zeros
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:  # the interpreter's dot mishandles bf16; products of bf16 are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _grouped_gemm_fp8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, offs_ptr, M, N, K, E,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_om, stride_on,
    E_PAD: tl.constexpr, QB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ex, row0, row_end, total = _expert_tile(offs_ptr, pid_m, M, E, E_PAD, BLOCK_M)
    if pid_m >= total:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, QB)
    rows64 = rows.to(tl.int64)
    we = tl.minimum(ex, E - 1).to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    xs_rows = xs_ptr + rows64 * stride_xsm
    w_cols = w_ptr + we * stride_we + cols[None, :] * stride_wn
    ws_cols = ws_ptr + we * stride_wse + (cols // QB) * stride_wsn
    n_kb = tl.where(ex < E, tl.cdiv(K, QB), 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_kb):
        kk = kb * QB + ks
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        sa = tl.load(xs_rows + kb * stride_xsk, mask=row_ok, other=0.0)
        sb = tl.load(ws_cols + kb * stride_wsk, mask=col_ok, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # promotion once per 128-wide K block
    out = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _segment_of(offs_ptr, e, M):
    """(start, end) rows of expert e, clamped to [0, M]."""
    start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
    end = tl.minimum(tl.load(offs_ptr + e), M)
    return tl.minimum(start, end), end


def _grouped_wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr, offs_ptr, M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ns = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    dy_cols = dy_ptr + ns.to(tl.int64)[:, None] * stride_dyn  # int64: column-major operands have
    x_cols = x_ptr + ks.to(tl.int64)[None, :] * stride_xk     # M-sized strides here
    start, end = _segment_of(offs_ptr, e, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_ok = rows < end
        a = tl.load(dy_cols + rows[None, :] * stride_dym,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # dy_e^T tile [BLOCK_N, BLOCK_M]
        b = tl.load(x_cols + rows[:, None] * stride_xm,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # x_e tile [BLOCK_M, BLOCK_K]
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    out = dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _grouped_wgrad_fp8_kernel(
    dy_ptr, dys_ptr, x_ptr, xs_ptr, dw_ptr, offs_ptr, M, N, K,
    stride_dyn, stride_dym, stride_dysn, stride_dysm,
    stride_xk, stride_xm, stride_xsk, stride_xsm,
    stride_we, stride_wn, stride_wk,
    QB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ns = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    ns64 = ns.to(tl.int64)  # these index tensors whose row stride is M
    ks64 = ks.to(tl.int64)
    start, end = _segment_of(offs_ptr, e, M)  # multiples of QB (checked on the host)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Loop over whole 128-token blocks: written as mb * QB, the row offsets are provably
    # 128-aligned and need no mask, so the FP8 tiles can be fetched in 16-byte vectors; a loop
    # from `start` (a value loaded at run time) hides that alignment from the compiler.
    for mb in range(start // QB, end // QB):
        rows = (mb * QB + tl.arange(0, QB)).to(tl.int64)
        a = tl.load(dy_ptr + ns64[:, None] * stride_dyn + rows[None, :] * stride_dym,
                    mask=n_ok[:, None], other=0.0)  # [BLOCK_N, 128]
        b = tl.load(x_ptr + rows[:, None] * stride_xm + ks64[None, :] * stride_xk,
                    mask=k_ok[None, :], other=0.0)  # [128, BLOCK_K]
        sa = tl.load(dys_ptr + ns64 * stride_dysn + mb * stride_dysm, mask=n_ok, other=0.0)
        sb = tl.load(xs_ptr + ks64 * stride_xsk + mb * stride_xsm, mask=k_ok, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    out = dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------
# Building and launching
# --------------------------------------------------------------------------------------------


class _Built(NamedTuple):
    triton: object
    interpret: bool
    fwd: object
    fwd_fp8: object
    wgrad: object
    wgrad_fp8: object


_BUILT: _Built | None = None
_SMEM_BUDGET = 200 * 1024  # bytes of pipelined operand tiles (Hopper has 227 KiB per block)


def _prune(a_name: str, b_name: str, tiles):
    """Drop configs whose pipelined operand tiles overflow shared memory or whose float32
    accumulator exceeds 128 registers per thread. tiles(cfg) -> (acc elems, a elems, b elems)."""

    def prune(configs, named_args, **kwargs):
        ea = named_args[a_name].element_size()
        eb = named_args[b_name].element_size()
        keep = []
        for c in configs:
            acc, a, b = tiles(c.kwargs)
            if c.num_stages * (a * ea + b * eb) <= _SMEM_BUDGET and acc <= 128 * 32 * c.num_warps:
                keep.append(c)
        return keep or configs[:1]

    return prune


def _kernels() -> _Built:
    global _BUILT, tl, _expert_tile, _segment_of
    if _BUILT is not None:
        return _BUILT
    try:
        import triton
        import triton.language as triton_language
    except ImportError as exc:  # the references above still work
        raise RuntimeError("the grouped GEMM kernels need triton; use the *_reference functions") from exc
    tl = triton_language
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _expert_tile = triton.jit(_expert_tile)
    _segment_of = triton.jit(_segment_of)
    fwd, fwd_fp8 = triton.jit(_grouped_gemm_kernel), triton.jit(_grouped_gemm_fp8_kernel)
    wgrad, wgrad_fp8 = triton.jit(_grouped_wgrad_kernel), triton.jit(_grouped_wgrad_fp8_kernel)
    if not interpret:
        Config = triton.Config
        fwd_configs = [Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64), num_warps=w, num_stages=s)
                       for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for s in (3, 4)]
        fp8_configs = [Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                       for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for s in (3, 4)]
        wgrad_configs = [Config(dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
                         for bn in (64, 128) for bk in (128, 256) for w in (4, 8) for s in (3, 4)]
        wgrad_fp8_configs = [Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
                             for bn in (64, 128) for bk in (128, 256) for w in (4, 8) for s in (3, 4)]
        # Keys: the problem's N and K (and the weight's K stride, so a transposed view tunes
        # separately); M changes every step with the routing and is left out on purpose.
        fwd = triton.autotune(
            fwd_configs, key=["N", "K", "stride_wk"],
            prune_configs_by={"early_config_prune": _prune(
                "x_ptr", "w_ptr", lambda m: (m["BLOCK_M"] * m["BLOCK_N"], m["BLOCK_M"] * m["BLOCK_K"],
                                             m["BLOCK_N"] * m["BLOCK_K"]))},
        )(fwd)
        fwd_fp8 = triton.autotune(
            fp8_configs, key=["N", "K", "stride_wk"],
            prune_configs_by={"early_config_prune": _prune(
                "x_ptr", "w_ptr", lambda m: (m["BLOCK_M"] * m["BLOCK_N"], m["BLOCK_M"] * QBLOCK,
                                             m["BLOCK_N"] * QBLOCK))},
        )(fwd_fp8)
        wgrad = triton.autotune(
            wgrad_configs, key=["N", "K"],
            prune_configs_by={"early_config_prune": _prune(
                "dy_ptr", "x_ptr", lambda m: (m["BLOCK_N"] * m["BLOCK_K"], m["BLOCK_N"] * m["BLOCK_M"],
                                              m["BLOCK_M"] * m["BLOCK_K"]))},
        )(wgrad)
        wgrad_fp8 = triton.autotune(
            wgrad_fp8_configs, key=["N", "K"],
            prune_configs_by={"early_config_prune": _prune(
                "dy_ptr", "x_ptr", lambda m: (m["BLOCK_N"] * m["BLOCK_K"], m["BLOCK_N"] * QBLOCK,
                                              QBLOCK * m["BLOCK_K"]))},
        )(wgrad_fp8)
    _BUILT = _Built(triton, interpret, fwd, fwd_fp8, wgrad, wgrad_fp8)
    return _BUILT


def _launch(name: str, grid, *args, **consts) -> None:
    """Run kernel `name`; grid(meta) -> grid tuple, meta holding the tile sizes."""
    k = _kernels()
    kernel = getattr(k, name)
    if k.interpret:
        meta = dict(_INTERPRET_META[name])
        kernel[grid(meta)](*args, **consts, **meta)
    else:
        kernel[grid](*args, **consts)


def _check_device(*tensors: torch.Tensor) -> None:
    k = _kernels()
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all operands must be on one device, got {dev} and {t.device}")
    if not k.interpret and dev.type != "cuda":
        raise ValueError(f"the Triton grouped GEMMs need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {dev}")


def _offsets_i32(offsets: torch.Tensor, E: int) -> torch.Tensor:
    if offsets.dim() != 1 or offsets.shape[0] != E:
        raise ValueError(f"offsets must have shape [{E}] (one cumulative row end per expert), "
                         f"got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 (or int64), got {offsets.dtype}")
    return offsets.to(torch.int32).contiguous()


def _int32_inner(t: torch.Tensor, name: str, copy: bool) -> torch.Tensor:
    """The forward kernels index every dimension but the first (rows, or experts) in int32:
    make sure those offsets fit, copying a strided activation to row-major if needed."""
    def fits(u):
        return sum((u.shape[d] - 1) * u.stride(d) for d in range(1, u.dim())) < 2**31
    if not fits(t) and copy:
        t = t.contiguous()
    if not fits(t):
        raise ValueError(f"{name} {tuple(t.shape)}: one row (or one expert's matrix) must span fewer than "
                         f"2**31 elements, got strides {t.stride()}")
    return t


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own TF32 switch; for 16-bit inputs the setting is ignored."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _e_pad(E: int) -> int:
    return 1 << E.bit_length()  # a power of two > E (room for the pseudo-expert E)


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out [M, N] (x's dtype): rows of expert e are x_e @ w[e].T; rows past offsets[-1] are 0.

    x [M, K] bf16/fp16/fp32 (rows sorted by expert); w [E, N, K] of the same dtype, any
    strides (w.transpose(1, 2) computes dy_e @ w[e]); offsets int32 [E] cumulative row ends.
    Accumulates in float32. No host sync.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"expected x [M, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in _FLOATS or w.dtype != x.dtype:
        raise ValueError(f"x and w must share one of {_FLOATS}, got {x.dtype} and {w.dtype}")
    M, K = x.shape
    E, N, _ = w.shape
    offs = _offsets_i32(offsets, E)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    _check_device(x, w, offs)
    x, w = _int32_inner(x, "x", copy=True), _int32_inner(w, "w", copy=False)
    interpret = _kernels().interpret
    _launch(
        "fwd", lambda m: (_cdiv(M, m["BLOCK_M"]) + E, _cdiv(N, m["BLOCK_N"])),
        x, w, out, offs, M, N, K, E,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        E_PAD=_e_pad(E), PRECISION=_precision(x.dtype), DOT_F32=interpret and x.dtype != torch.float32,
    )
    return out


def grouped_gemm_fp8(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 grouped GEMM: out[rows of e] = dequant(xq_e, xs_e) @ dequant(wq[e], ws[e]).T.

    xq [M, K] e4m3 with xs [M, ceil(K/128)] float32 (1x128 tiles along K); wq [E, N, K] e4m3
    with ws [E, ceil(N/128), ceil(K/128)] float32 (128x128 blocks). For the input gradient
    pass wq.transpose(1, 2) and ws.transpose(1, 2). Each 128-wide K block is promoted into a
    float32 accumulator with its two scales. Rows past offsets[-1] are 0. No host sync.
    """
    if xq.dim() != 2 or wq.dim() != 3 or xq.shape[1] != wq.shape[2]:
        raise ValueError(f"expected xq [M, K] and wq [E, N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE:
        raise ValueError(f"xq and wq must be {FP8_DTYPE}, got {xq.dtype} and {wq.dtype}")
    M, K = xq.shape
    E, N, _ = wq.shape
    KB = _cdiv(K, QBLOCK)
    if tuple(xs.shape) != (M, KB) or tuple(ws.shape) != (E, _cdiv(N, QBLOCK), KB):
        raise ValueError(f"scales must be xs [{M}, {KB}] and ws [{E}, {_cdiv(N, QBLOCK)}, {KB}], "
                         f"got {tuple(xs.shape)} and {tuple(ws.shape)}")
    if xs.dtype != torch.float32 or ws.dtype != torch.float32:
        raise ValueError(f"scales must be float32, got {xs.dtype} and {ws.dtype}")
    offs = _offsets_i32(offsets, E)
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return out
    _check_device(xq, xs, wq, ws, offs)
    xq, wq = _int32_inner(xq, "xq", copy=True), _int32_inner(wq, "wq", copy=False)
    _launch(
        "fwd_fp8", lambda m: (_cdiv(M, m["BLOCK_M"]) + E, _cdiv(N, m["BLOCK_N"])),
        xq, xs, wq, ws, out, offs, M, N, K, E,
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1),
        wq.stride(0), wq.stride(1), wq.stride(2), ws.stride(0), ws.stride(1), ws.stride(2),
        out.stride(0), out.stride(1),
        E_PAD=_e_pad(E), QB=QBLOCK,
    )
    return out


def grouped_gemm_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW [E, N, K]: dW[e] = dy_e^T @ x_e over expert e's rows (zeros for experts without rows).

    dy [M, N], x [M, K] of one float dtype, any strides; float32 accumulation. No host sync.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"expected dy [M, N] and x [M, K], got {tuple(dy.shape)} and {tuple(x.shape)}")
    if x.dtype not in _FLOATS or dy.dtype != x.dtype:
        raise ValueError(f"dy and x must share one of {_FLOATS}, got {dy.dtype} and {x.dtype}")
    M, N = dy.shape
    K = x.shape[1]
    E = offsets.shape[0] if offsets.dim() == 1 else -1
    offs = _offsets_i32(offsets, E)
    dw = torch.empty(E, N, K, dtype=out_dtype, device=x.device)
    if E == 0 or N == 0 or K == 0:
        return dw
    _check_device(dy, x, offs)
    interpret = _kernels().interpret
    _launch(
        "wgrad", lambda m: (_cdiv(N, m["BLOCK_N"]) * _cdiv(K, m["BLOCK_K"]), E),
        dy, x, dw, offs, M, N, K,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        PRECISION=_precision(x.dtype), DOT_F32=interpret and x.dtype != torch.float32,
    )
    return dw


def grouped_gemm_wgrad_fp8(dyq_t: torch.Tensor, dys_t: torch.Tensor, xq_t: torch.Tensor, xs_t: torch.Tensor,
                           offsets: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                           check: bool = True) -> torch.Tensor:
    """FP8 weight gradient dW [E, N, K], dW[e] = dy_e^T @ x_e, from transposed quantisations.

    dyq_t [N, M] e4m3 with dys_t [N, ceil(M/128)] and xq_t [K, M] e4m3 with xs_t [K, ceil(M/128)]
    (1x128 tiles along M, i.e. along the reduction). Every expert's rows must start and end on
    a multiple of 128 so that no scale tile straddles two experts (see pad_offsets_to; padding
    rows zero). check=True verifies that with one host sync; pass check=False where the layout
    guarantees it (e.g. offsets from pad_offsets_to) to keep the hot path sync-free.
    """
    if dyq_t.dim() != 2 or xq_t.dim() != 2 or dyq_t.shape[1] != xq_t.shape[1]:
        raise ValueError(f"expected dyq_t [N, M] and xq_t [K, M], got {tuple(dyq_t.shape)} and {tuple(xq_t.shape)}")
    if dyq_t.dtype != FP8_DTYPE or xq_t.dtype != FP8_DTYPE:
        raise ValueError(f"dyq_t and xq_t must be {FP8_DTYPE}, got {dyq_t.dtype} and {xq_t.dtype}")
    N, M = dyq_t.shape
    K = xq_t.shape[0]
    MB = _cdiv(M, QBLOCK)
    if tuple(dys_t.shape) != (N, MB) or tuple(xs_t.shape) != (K, MB):
        raise ValueError(f"scales must be dys_t [{N}, {MB}] and xs_t [{K}, {MB}], "
                         f"got {tuple(dys_t.shape)} and {tuple(xs_t.shape)}")
    if dys_t.dtype != torch.float32 or xs_t.dtype != torch.float32:
        raise ValueError(f"scales must be float32, got {dys_t.dtype} and {xs_t.dtype}")
    E = offsets.shape[0] if offsets.dim() == 1 else -1
    offs = _offsets_i32(offsets, E)
    if check:
        check_fp8_wgrad_offsets(offs)
    dw = torch.empty(E, N, K, dtype=out_dtype, device=xq_t.device)
    if E == 0 or N == 0 or K == 0:
        return dw
    _check_device(dyq_t, dys_t, xq_t, xs_t, offs)
    _launch(
        "wgrad_fp8", lambda m: (_cdiv(N, m["BLOCK_N"]) * _cdiv(K, m["BLOCK_K"]), E),
        dyq_t, dys_t, xq_t, xs_t, dw, offs, M, N, K,
        dyq_t.stride(0), dyq_t.stride(1), dys_t.stride(0), dys_t.stride(1),
        xq_t.stride(0), xq_t.stride(1), xs_t.stride(0), xs_t.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        QB=QBLOCK,
    )
    return dw


def _on_gpu(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


# On Hopper, `grouped_fp8` runs the warp-specialised Gluon kernel of grouped_wgmma.py when the
# operands allow it (kernels.grouped_fp8 = auto or gluon); triton times the Triton kernel instead.
WGMMA_DISABLED_BECAUSE: str | None = None  # why the Gluon kernel was given up, if it was


def _wgmma_applies(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    if selection.active().grouped_fp8 == "triton" or WGMMA_DISABLED_BECAUSE is not None:
        return False
    if torch.cuda.get_device_capability(xq.device)[0] != 9:
        return False
    K, N = xq.shape[1], wq.shape[1]
    return xq.is_contiguous() and wq.is_contiguous() and K % 16 == 0 and N % 8 == 0


def grouped_fp8(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What the FP8 experts call: the grouped FP8 GEMM on CUDA, its torch reference elsewhere.

    offsets must be 128-aligned (every expert's rows start on a multiple of 128, as
    pad_offsets_to lays them out; unchecked, to keep the hot path free of host syncs). On a
    Hopper GPU that lets the Gluon kernel of grouped_wgmma.py run (TMA, warp-specialised
    wgmma); elsewhere, or if that kernel cannot be built with this Triton (a warning says
    why, once), the Triton kernel above runs.
    """
    global WGMMA_DISABLED_BECAUSE
    if not _on_gpu(xq, wq):
        return grouped_gemm_fp8_reference(xq, xs, wq, ws, offsets, out_dtype)
    forced = selection.active().grouped_fp8 == "gluon"
    if forced and not _wgmma_applies(xq, wq):
        raise RuntimeError("kernels.grouped_fp8=gluon: the Gluon kernel needs a Hopper GPU and contiguous operands "
                           "with K % 16 == 0 and N % 8 == 0" + (f" (given up: {WGMMA_DISABLED_BECAUSE})"
                                                                 if WGMMA_DISABLED_BECAUSE else ""))
    if _wgmma_applies(xq, wq):
        from .grouped_wgmma import grouped_gemm_fp8_wgmma
        try:
            return grouped_gemm_fp8_wgmma(xq, xs, wq, ws, offsets, out_dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # an older/newer Gluon API: fall back, but say so
            if forced:
                raise
            import warnings
            WGMMA_DISABLED_BECAUSE = f"{type(exc).__name__}: {exc}"[:500]
            warnings.warn("the Gluon grouped FP8 kernel is unavailable, using the Triton kernel: "
                          + WGMMA_DISABLED_BECAUSE, RuntimeWarning, stacklevel=2)
    return grouped_gemm_fp8(xq, xs, wq, ws, offsets, out_dtype)


def grouped_fp8_wgrad(dyq_t: torch.Tensor, dys_t: torch.Tensor, xq_t: torch.Tensor, xs_t: torch.Tensor,
                      offsets: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`grouped_gemm_wgrad_fp8` on CUDA (offsets must come 128-aligned, unchecked: no host
    sync), its torch reference elsewhere."""
    if _on_gpu(dyq_t, xq_t):
        return grouped_gemm_wgrad_fp8(dyq_t, dys_t, xq_t, xs_t, offsets, out_dtype, check=False)
    return grouped_gemm_wgrad_fp8_reference(dyq_t, dys_t, xq_t, xs_t, offsets, out_dtype)
