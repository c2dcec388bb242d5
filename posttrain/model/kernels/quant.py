"""Triton kernels for blockwise FP8 quantisation: activations (1x128), their transpose, the
fused SwiGLU product, and weights (128x128). Conventions: see `reference.py`.

Why the arithmetic looks the way it does:

* Divisions use `tl.math.div_rn` (IEEE round-to-nearest). Triton's plain `/` on fp32 lowers
  to the approximate `div.full.f32` on NVIDIA GPUs, which would make q and s differ from
  `fp8.weight_quant` (the checkpoint format) and from the torch references in the last bit.
* fp32 -> e4m3 is the hardware conversion on the GPU (round to nearest even, saturating),
  the same rounding torch uses. Triton's CPU interpreter (TRITON_INTERPRET=1, which the tests
  use) converts differently: it rounds ties away from zero and flushes e4m3 subnormals. So
  under the interpreter, and only there, the kernels first round the value onto the e4m3 grid
  in fp32 (`_round_to_e4m3_grid`), after which the conversion is exact. `EMULATE_RNE` is a
  constexpr: on the GPU that code is not compiled at all.
* NaN propagates as in torch (a tile holding NaN gets a NaN scale), see `_absmax`.
* The activation kernels are memory bound: each program loads a [rows, groups, 128] tile,
  takes the 1x128 amax, and writes e4m3 plus one fp32 scale per tile. Compiled for sm_90
  (Triton 3.9, ahead of time, no GPU here) the loads and stores are 16-byte vectors when K
  (and, for the transposed kernel, M) is a multiple of 16, which Triton specialises on;
  other sizes fall back to scalar accesses. Autotuning picks rows x groups and num_warps
  per (K, bucket of M); the token count M changes every batch, so it is bucketed to powers
  of two instead of being a key itself.

The `*_triton` functions are Triton-only: they need Triton and CUDA tensors (or the
interpreter). The device-agnostic entry points, which fall back to the torch references, are
`act_quant`, `act_quant_t`, `swiglu_act_quant` and `weight_quant` at the end. Triton is
imported and the kernels are wrapped on first use (`build()`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from . import reference as ref
from .reference import BLOCK, FP8_DTYPE, FP8_MAX, cdiv


def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAVE_TRITON = _triton_importable()

# Triton is imported, and the kernels below are wrapped with triton.jit, on first use
# (`build()`), not at import: importing this package must neither need Triton nor fix
# Triton's interpreter mode (TRITON_INTERPRET is read when a kernel is wrapped), which other
# test modules set for their own kernels. The kernel bodies look `tl` and the helpers up as
# module globals when they are compiled, after `build()` has bound them.
tl = None


class Built(NamedTuple):
    triton: object
    tl: object
    interpret: bool
    act: object          # plain jit kernels, launched with a fixed tile (interpreter, tests)
    act_t: object
    weight: object
    act_tuned: object    # autotuned wrappers of the same kernels (GPU)
    act_t_tuned: object


_BUILT: Built | None = None
_INT32_LIMIT = 2**31 - 1


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: fixed when they are built, else
    what TRITON_INTERPRET says now."""
    if _BUILT is not None:
        return _BUILT.interpret
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(*tensors: torch.Tensor) -> Built:
    """Build the kernels, or raise a clear error unless Triton can launch on these tensors."""
    built = build()
    if not built.interpret:
        for t in tensors:
            if not t.is_cuda:
                raise ValueError(f"Triton kernels need CUDA tensors (got one on {t.device}); on CPU use the "
                                 "torch references, or set TRITON_INTERPRET=1 before the first kernel call")
    for t in tensors:
        if t.numel() > _INT32_LIMIT:
            raise ValueError(f"tensor of {t.numel()} elements: the kernels index with int32 offsets "
                             f"(at most {_INT32_LIMIT}); split the call")
    return built


def m_bucket(m: int) -> int:
    """Power-of-two bucket of a row count, the autotuning key for the varying token count."""
    return min(1 << max(m - 1, 0).bit_length(), 1 << 16)


# ----------------------------------------------------------------------------- device helpers

def _round_to_e4m3_grid(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    Normal range (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits with round-to-nearest-even
    done on the bit pattern (add 0x7FFFF plus the lowest kept bit, then clear the 20 dropped
    bits). Subnormal range: e4m3's spacing there is 2^-9, and adding then subtracting 2^14
    (whose fp32 ulp is 2^-9) rounds |v| to a multiple of 2^-9, ties to even.
    """
    bits = v.to(tl.int32, bitcast=True)
    keep_lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + keep_lsb) & -1048576).to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0
    sub = tl.where(bits < 0, -sub, sub)  # the sign bit, so that -0.0 stays -0.0
    return tl.where(a < 0.015625, sub, normal)


def _to_e4m3(y, EMULATE_RNE: tl.constexpr):
    """fp32 (already clamped to +-448) -> e4m3, round to nearest even on every backend."""
    if EMULATE_RNE:
        y = _round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv)


def _absmax(x, axis: tl.constexpr):
    """max |x| along `axis` (None: all of x), NaN if any element is NaN, as torch's amax.

    `tl.max` ignores NaN, which would quantise a NaN gradient to finite values and hide it
    from the trainer's non-finite-loss check; a second (integer) max flags NaN. A NaN-keeping
    combine function in `tl.reduce` would do it in one pass on the GPU, but the interpreter
    runs custom combines element by element (minutes for the tests).
    """
    amax = tl.max(tl.abs(x), axis)
    has_nan = tl.max((x != x).to(tl.int32), axis)
    return tl.where(has_nan > 0, float("nan"), amax)


def _quant_tile(x, amax, EMULATE_RNE: tl.constexpr):
    """x / (amax / 448) clamped and rounded to e4m3; returns (q, scale). amax broadcasts to x.
    NaN stays NaN through the clamp, as in torch."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-12, propagate_nan=tl.PropagateNan.ALL), 448.0)
    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return _to_e4m3(y, EMULATE_RNE), s


# ----------------------------------------------------------------------------- 1x128 rows

_ROW_CONFIGS = [
    # (rows per program, 128-wide groups per program, num_warps)
    (4, 8, 4), (8, 4, 4), (16, 4, 8), (32, 2, 8), (64, 1, 8), (8, 8, 8),
]


def _act_quant_kernel(x_ptr, g_ptr, w_ptr, q_ptr, s_ptr, M, K, M_BUCKET,
                      stride_xm, stride_xk, stride_gm, stride_gk, stride_qm, stride_sm,
                      SWIGLU: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr,
                      EMULATE_RNE: tl.constexpr):
    """One program: BLOCK_M rows x GROUPS tiles of 128. With SWIGLU, x is `up` and g is `gate`;
    with HAS_W, each row is multiplied by its weight w[row] (float32) before quantising."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = pid_k * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * 128 + tl.arange(0, 128)[None, :]            # [G, 128]
    r3 = rows[:, None, None]
    c3 = cols[None, :, :]
    mask = (r3 < M) & (c3 < K)
    x = tl.load(x_ptr + r3 * stride_xm + c3 * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        g = tl.load(g_ptr + r3 * stride_gm + c3 * stride_gk, mask=mask, other=0.0).to(tl.float32)
        x = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * x                       # silu(gate) * up, fp32
    if HAS_W:
        x = x * tl.load(w_ptr + r3, mask=r3 < M, other=0.0)
    amax = _absmax(x, 2)                                                   # [BM, G]
    q, s = _quant_tile(x, amax[:, :, None], EMULATE_RNE)
    tl.store(q_ptr + r3 * stride_qm + c3, q, mask=mask)
    n_groups = tl.cdiv(K, 128)
    s_mask = (rows[:, None] < M) & (groups[None, :] < n_groups)
    tl.store(s_ptr + rows[:, None] * stride_sm + groups[None, :], tl.reshape(s, (BLOCK_M, GROUPS)), mask=s_mask)




def _check_row_w(row_w: torch.Tensor | None, m: int) -> None:
    if row_w is not None and (row_w.shape != (m,) or row_w.dtype != torch.float32):
        raise ValueError(f"row weights must be float32 [{m}], got {row_w.dtype} {tuple(row_w.shape)}")


def _launch_rows(built: Built, x2: torch.Tensor, g2: torch.Tensor | None, config: tuple[int, int, int] | None,
                 row_w: torch.Tensor | None = None):
    m, k = x2.shape
    _check_row_w(row_w, m)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x2.device)
    s = torch.empty(m, cdiv(k, BLOCK), dtype=torch.float32, device=x2.device)
    if m == 0 or k == 0:
        return q, s
    g = g2 if g2 is not None else x2
    args = (x2, g, row_w if row_w is not None else s, q, s, m, k, m_bucket(m), x2.stride(0), x2.stride(1),
            g.stride(0), g.stride(1), q.stride(0), s.stride(0))
    swiglu = g2 is not None
    n_groups = cdiv(k, BLOCK)
    if config is None and not built.interpret:
        def grid(meta):
            return cdiv(m, meta["BLOCK_M"]), cdiv(n_groups, meta["GROUPS"])
        built.act_tuned[grid](*args, SWIGLU=swiglu, HAS_W=row_w is not None, EMULATE_RNE=False)
    else:  # a fixed tile: under the interpreter (no benchmarking there) or when a test asks
        bm, groups, warps = config or (8, 2, 4)
        built.act[(cdiv(m, bm), cdiv(n_groups, groups))](
            *args, SWIGLU=swiglu, HAS_W=row_w is not None, BLOCK_M=bm, GROUPS=groups, EMULATE_RNE=built.interpret,
            num_warps=warps)
    return q, s


def act_quant_triton(x: torch.Tensor, config: tuple[int, int, int] | None = None):
    """x [..., K] (any float dtype, any strides of the 2-D row view) -> (q [..., K], s [..., ceil(K/128)]).

    `config` = (rows, groups, num_warps) pins one tile shape instead of autotuning (tests).
    """
    built = require_triton(x)
    k = x.shape[-1]
    q, s = _launch_rows(built, x.reshape(-1, k), None, config)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def swiglu_act_quant_triton(gate: torch.Tensor, up: torch.Tensor,
                            config: tuple[int, int, int] | None = None, row_w: torch.Tensor | None = None):
    """act_quant(silu(gate) * up) fused: one read of each input, the product never leaves fp32.
    row_w (float32, one per row of the 2-D row view) multiplies each row first."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    built = require_triton(gate, up)
    k = up.shape[-1]
    q, s = _launch_rows(built, up.reshape(-1, k), gate.reshape(-1, k), config, row_w)
    return q.view(up.shape), s.view(*up.shape[:-1], s.shape[-1])


# ----------------------------------------------------------------------------- transposed

_T_CONFIGS = [
    # (columns of x per program, num_warps); each program covers 128 rows of x
    (32, 4), (64, 4), (64, 8), (128, 8),
]


def _act_quant_t_kernel(x_ptr, g_ptr, w_ptr, q_ptr, s_ptr, M, K, M_BUCKET,
                        stride_xm, stride_xk, stride_gm, stride_gk, stride_qk, stride_sk, stride_sm,
                        SWIGLU: tl.constexpr, HAS_W: tl.constexpr, BLOCK_K: tl.constexpr,
                        EMULATE_RNE: tl.constexpr):
    """One program: x[128 rows, BLOCK_K cols] -> q_t[BLOCK_K, 128] and s_t[BLOCK_K, 1].
    With SWIGLU, x is `up` and g is `gate`, and silu(gate) * up is quantised; with HAS_W each
    row is first multiplied by its weight w[row].

    x is read along its contiguous K (coalesced); the amax runs down the 128 rows, and the
    transposed store lets the compiler stage the tile through shared memory, so x.T never
    exists in high precision.
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * 128 + tl.arange(0, 128)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if SWIGLU:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gk, mask=mask, other=0.0)
        g = g.to(tl.float32)
        x = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * x
    if HAS_W:
        x = x * tl.load(w_ptr + rows, mask=rows < M, other=0.0)[:, None]
    amax = _absmax(x, 0)                                                   # [BLOCK_K]
    q, s = _quant_tile(x, amax[None, :], EMULATE_RNE)
    tl.store(q_ptr + cols[None, :] * stride_qk + rows[:, None], q, mask=mask)
    tl.store(s_ptr + cols * stride_sk + pid_m * stride_sm, tl.reshape(s, (BLOCK_K,)), mask=cols < K)


def _launch_t(built: Built, x: torch.Tensor, g: torch.Tensor | None, config: tuple[int, int] | None,
              row_w: torch.Tensor | None = None):
    m, k = x.shape
    _check_row_w(row_w, m)
    q = torch.empty(k, m, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(cdiv(m, BLOCK), k, dtype=torch.float32, device=x.device).t()
    if m == 0 or k == 0:
        return q, s
    gg = g if g is not None else x
    args = (x, gg, row_w if row_w is not None else s, q, s, m, k, m_bucket(m), x.stride(0), x.stride(1),
            gg.stride(0), gg.stride(1), q.stride(0), s.stride(0), s.stride(1))
    flags = dict(SWIGLU=g is not None, HAS_W=row_w is not None)
    if config is None and not built.interpret:
        def grid(meta):
            return cdiv(k, meta["BLOCK_K"]), cdiv(m, BLOCK)
        built.act_t_tuned[grid](*args, **flags, EMULATE_RNE=False)
    else:
        bk, warps = config or (32, 4)
        built.act_t[(cdiv(k, bk), cdiv(m, BLOCK))](*args, **flags, BLOCK_K=bk, EMULATE_RNE=built.interpret,
                                                   num_warps=warps)
    return q, s


def act_quant_t_triton(x: torch.Tensor, config: tuple[int, int] | None = None):
    """x [M, K] -> (q_t [K, M] contiguous, s_t [K, ceil(M/128)]): the 1x128 quantisation of x.T.

    s_t is a transposed view (strides (1, K)), as the reference returns it: the weight-gradient
    GEMMs read one scale per output row and column for each 128 tokens, and this layout makes
    those reads contiguous; it is also the layout cuBLAS wants, so no copy is made there.
    `config` = (BLOCK_K, num_warps) pins one tile shape instead of autotuning (tests).
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant_t takes a 2-D tensor, got shape {tuple(x.shape)}")
    return _launch_t(require_triton(x), x, None, config)


def swiglu_act_quant_t_triton(gate: torch.Tensor, up: torch.Tensor, config: tuple[int, int] | None = None,
                              row_w: torch.Tensor | None = None):
    """act_quant_t(silu(gate) * up) fused: the product is formed in fp32 and never stored (the
    FP8 experts' weight gradient of the down projection recomputes it this way). row_w
    (float32 [M]) multiplies each row first."""
    if gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(f"gate and up must share one [M, I] shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _launch_t(require_triton(gate, up), up, gate, config, row_w)


# ----------------------------------------------------------------------------- 128x128 weights

def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K,
                         stride_we, stride_wn, stride_wk, stride_qe, stride_qn,
                         stride_se, stride_sn, stride_sk, stride_qte, stride_qtk,
                         stride_ste, stride_stk, stride_stn,
                         TRANSPOSED: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """One program per 128x128 block (grid: row blocks, column blocks, experts). With
    TRANSPOSED the block is also stored transposed into q_t [E, K, N] (and its scale into
    s_t [E, K/128, N/128]): the input-gradient GEMMs want W^T with K innermost, and a 128x128
    block quantises to the same bytes either way round."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w_in = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                   mask=mask, other=0.0)
    w = w_in.to(tl.float32)
    amax = _absmax(w, None)
    q, s = _quant_tile(w, amax, EMULATE_RNE)
    tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, s)
    if TRANSPOSED:
        # The tile is transposed in its input dtype and quantised a second time (same scale,
        # same bytes): moving 2-byte elements through shared memory ran 1.36x faster on an
        # H100 than transposing the 1-byte FP8 tile (benchmarks/tune_weight_quant.py).
        qt, _ = _quant_tile(tl.trans(w_in).to(tl.float32), amax, EMULATE_RNE)
        tl.store(qt_ptr + e * stride_qte + cols[:, None] * stride_qtk + rows[None, :], qt,
                 mask=tl.trans(mask))
        tl.store(st_ptr + e * stride_ste + pid_k * stride_stk + pid_n * stride_stn, s)


_WEIGHT_WARPS = 8  # one 128x128 block per program (benchmarks/tune_weight_quant.py, RESULTS.md)


def _quant_weight_into(built: Built, w3: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                       q_t: torch.Tensor | None = None, s_t: torch.Tensor | None = None) -> None:
    """Quantise w3 [E, N, K] into q [E, N, K] / s [E, N/128, K/128] (and q_t [E, K, N] / s_t),
    which may be views into larger buffers as long as their last dimension is contiguous."""
    e, n, k = w3.shape
    if not q.numel():
        return
    if q.stride(2) != 1 or (q_t is not None and q_t.stride(2) != 1):
        raise ValueError("the FP8 outputs of weight_quant need a contiguous last dimension")
    t = q_t is not None
    qt, st = (q_t, s_t) if t else (q, s)
    built.weight[(cdiv(n, BLOCK), cdiv(k, BLOCK), e)](
        w3, q, s, qt, st, n, k, w3.stride(0), w3.stride(1), w3.stride(2), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), s.stride(2), qt.stride(0), qt.stride(1),
        st.stride(0), st.stride(1), st.stride(2),
        TRANSPOSED=t, EMULATE_RNE=built.interpret, num_warps=_WEIGHT_WARPS)


def _weight_outputs(e: int, n: int, k: int, device, transposed: bool):
    q = torch.empty(e, n, k, dtype=FP8_DTYPE, device=device)
    s = torch.empty(e, cdiv(n, BLOCK), cdiv(k, BLOCK), dtype=torch.float32, device=device)
    if not transposed:
        return q, s, None, None
    return (q, s, torch.empty(e, k, n, dtype=FP8_DTYPE, device=device),
            torch.empty(e, cdiv(k, BLOCK), cdiv(n, BLOCK), dtype=torch.float32, device=device))


def weight_quant_triton(w: torch.Tensor):
    """w [N, K] or [E, N, K] -> (q, s [..., ceil(N/128), ceil(K/128)]), equal to `fp8.weight_quant`
    bit for bit. Runs once per weight per step, so it is not autotuned."""
    if w.dim() not in (2, 3):
        raise ValueError(f"weight_quant takes [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    built = require_triton(w)
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    q, s, _, _ = _weight_outputs(*w3.shape, w.device, False)
    _quant_weight_into(built, w3, q, s)
    return (q, s) if w.dim() == 3 else (q[0], s[0])


def weight_quant_t_triton(ws: list[torch.Tensor]):
    """Stacked experts' weights [E, N_i, K], i = 1.., quantised as their concatenation along N
    (each N_i but the last a multiple of 128, so no block mixes two of them) together with the
    transpose: (q [E, N, K], s, q_t [E, K, N], s_t [E, K/128, N/128]), N = sum N_i (if an N_i is not, the
concatenation is made and quantised as one). q_t equals
    q.transpose(1, 2).contiguous() bit for bit; neither the concatenation nor the transpose is
    ever made in high precision or as a separate copy."""
    if not ws or any(w.dim() != 3 or w.shape[0] != ws[0].shape[0] or w.shape[2] != ws[0].shape[2] for w in ws):
        raise ValueError(f"expected stacked weights [E, N_i, K] with one E and K, got {[tuple(w.shape) for w in ws]}")
    built = require_triton(*ws)
    if any(w.shape[1] % BLOCK for w in ws[:-1]):  # blocks would straddle two weights
        ws = [torch.cat(ws, 1)]
    e, k = ws[0].shape[0], ws[0].shape[2]
    q, s, q_t, s_t = _weight_outputs(e, sum(w.shape[1] for w in ws), k, ws[0].device, True)
    n0 = 0
    for w in ws:
        n1 = n0 + w.shape[1]
        b0, b1 = n0 // BLOCK, cdiv(n1, BLOCK)
        _quant_weight_into(built, w, q[:, n0:n1], s[:, b0:b1], q_t[:, :, n0:n1], s_t[:, :, b0:b1])
        n0 = n1
    return q, s, q_t, s_t


# ----------------------------------------------------------------------------- building

def jit_kernels(namespace: dict, helpers: tuple[str, ...], kernels: tuple[str, ...]) -> tuple:
    """For a kernel module whose bodies are plain functions until first use: build() (import
    Triton), bind the module's `tl`, jit its device helpers in place (the kernel bodies call
    them as module globals) and return its jitted kernels, in the order named."""
    built = build()
    namespace["tl"] = built.tl
    for name in helpers:
        namespace[name] = built.triton.jit(namespace[name])
    return tuple(built.triton.jit(namespace[name]) for name in kernels)


def build() -> Built:
    """Import Triton and wrap the kernels (once per process). Raises RuntimeError without Triton.

    TRITON_INTERPRET is read here: set, the kernels run on CPU tensors in Triton's interpreter
    with fixed tiles; unset, they are autotuned for the GPU and need CUDA tensors.
    """
    global _BUILT, tl, _round_to_e4m3_grid, _to_e4m3, _absmax, _quant_tile
    if _BUILT is not None:
        return _BUILT
    try:
        import triton
        import triton.language as triton_language
    except ImportError as exc:
        raise RuntimeError(f"Triton is not installed ({exc}); use the torch references in "
                           "posttrain.model.kernels.reference or the dispatching functions") from exc
    tl = triton_language
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _round_to_e4m3_grid, _to_e4m3 = triton.jit(_round_to_e4m3_grid), triton.jit(_to_e4m3)
    _absmax, _quant_tile = triton.jit(_absmax), triton.jit(_quant_tile)
    act, act_t = triton.jit(_act_quant_kernel), triton.jit(_act_quant_t_kernel)
    weight = triton.jit(_weight_quant_kernel)
    act_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "GROUPS": g}, num_warps=w) for bm, g, w in _ROW_CONFIGS],
        key=["K", "M_BUCKET", "SWIGLU", "HAS_W"])(act)
    act_t_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in _T_CONFIGS],
        key=["K", "M_BUCKET", "SWIGLU", "HAS_W"])(act_t)
    _BUILT = Built(triton, triton_language, interpret, act, act_t, weight, act_tuned, act_t_tuned)
    return _BUILT


# ----------------------------------------------------------------------------- dispatch

def _use_triton(*tensors: torch.Tensor) -> bool:
    return HAVE_TRITON and all(t.is_cuda for t in tensors)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 activation quantisation: Triton on CUDA, the torch reference elsewhere."""
    return act_quant_triton(x) if _use_triton(x) else ref.act_quant(x)


def act_quant_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 quantisation of x.T for the weight-gradient GEMM: Triton on CUDA, else torch."""
    return act_quant_t_triton(x) if _use_triton(x) else ref.act_quant_t(x)


def swiglu_act_quant(gate: torch.Tensor, up: torch.Tensor,
                     row_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (row_w *) silu(gate) * up -> 1x128 FP8: Triton on CUDA, else torch."""
    if _use_triton(gate, up):
        return swiglu_act_quant_triton(gate, up, row_w=row_w)
    return ref.swiglu_act_quant(gate, up, row_w)


def swiglu_act_quant_t(gate: torch.Tensor, up: torch.Tensor,
                       row_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (row_w *) silu(gate) * up -> 1x128 FP8 of its transpose: Triton on CUDA, else torch."""
    if _use_triton(gate, up):
        return swiglu_act_quant_t_triton(gate, up, row_w=row_w)
    return ref.act_quant_t(ref.swiglu(gate, up, row_w))


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 weight quantisation ([N, K] or [E, N, K]): Triton on CUDA, else torch."""
    return weight_quant_triton(w) if _use_triton(w) else ref.weight_quant(w)


def weight_quant_t(*ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, s, q_t, s_t) of the experts' weights [E, N_i, K] concatenated along N, with the
    K-major transpose for the input gradient (see `weight_quant_t_triton`): Triton on CUDA,
    else torch."""
    if _use_triton(*ws):
        return weight_quant_t_triton(list(ws))
    return ref.weight_quant_t(list(ws))


__all__ = [
    "HAVE_TRITON", "FP8_MAX", "build", "interpreting", "require_triton", "m_bucket",
    "act_quant_triton", "act_quant_t_triton", "swiglu_act_quant_triton", "weight_quant_triton",
    "act_quant", "act_quant_t", "swiglu_act_quant", "swiglu_act_quant_t", "weight_quant", "weight_quant_t",
    "swiglu_act_quant_t_triton", "weight_quant_t_triton",
]
