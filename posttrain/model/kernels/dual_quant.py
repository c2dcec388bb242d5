"""One read, both FP8 layouts: x -> (1x128 rows of x, 1x128 rows of x.T).

Every activation of an FP8 training step is quantised twice: along its features for the
forward or input-gradient GEMM (`act_quant`: q [M, K], s [M, K/128]) and along its tokens for
the weight-gradient GEMM (`act_quant_t`: q_t [K, M], s_t [K, M/128]). Done apart, each reads x
from memory; here one program loads a 128 x 128 tile once and writes both, so x (the expert
input, the output gradient, the SwiGLU input gradient) is read once instead of twice.

`swiglu_backward_dual_quant` goes one step further for the SwiGLU input gradient [dg | du]:
it computes dg and du from gate, up and dh (as `swiglu.swiglu_backward`) and quantises them
both ways in the same pass, so the [M, 2I] bf16 gradient is never written at all. It needs
I to be a multiple of 128 (a 128-wide group must not straddle dg and du); otherwise it falls
back to the two steps.

Values are bit-identical to `act_quant` and `act_quant_t` (same tiles, same arithmetic; the
tests compare them under TRITON_INTERPRET=1). Entry points dispatch: Triton on CUDA, the torch
references elsewhere.
"""

from __future__ import annotations

import torch

from . import quant
from . import reference as ref
from .reference import BLOCK, FP8_DTYPE, cdiv
from .swiglu import swiglu_backward

tl = None  # bound by _kernels(); kernel bodies look module globals up when they are compiled
_absmax = _quant_tile = None
_KERNELS = None


def _rows_quant(v, rows, cols, group, M, K, q_ptr, s_ptr, stride_qm, stride_sm, EMULATE_RNE: tl.constexpr):
    """1x128 quantisation of v [CHUNK rows, 128 cols] along its rows: q[rows, cols], s[rows, group]."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    q, s = _quant_tile(v, _absmax(v, 1)[:, None], EMULATE_RNE)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + group, tl.reshape(s, (v.shape[0],)), mask=rows < M)


def _cols_quant(v, amax_c, rows, cols, M, K, qt_ptr, stride_qtk, EMULATE_RNE: tl.constexpr):
    """v [CHUNK rows, 128 cols] quantised with the column scales of its whole 128-row block
    (amax_c [128]) and stored transposed: q_t[cols, rows]. Returns the scales."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    qt, st = _quant_tile(v, amax_c[None, :], EMULATE_RNE)
    tl.store(qt_ptr + cols[None, :].to(tl.int64) * stride_qtk + rows[:, None], qt, mask=mask)
    return st


def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def _dual_quant_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, M_BUCKET, stride_xm, stride_xk,
                       stride_qm, stride_sm, stride_qtk, stride_stk, stride_stm,
                       CHUNK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """One program: x[128 rows, 128 cols] -> its tiles of both layouts, in chunks of CHUNK rows.

    The row quantisation and the column amax take one pass over the chunks; the column
    quantisation a second, which reloads the 128 x 128 tile from cache (DRAM reads it once).
    Holding the whole tile in registers instead spills (two reductions and a transposed store
    of 16K fp32 values)."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_k * 128 + tl.arange(0, 128)
    amax_c = tl.zeros([128], dtype=tl.float32)
    for i in tl.static_range(0, 128, CHUNK):
        rows = pid_m * 128 + i + tl.arange(0, CHUNK)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk,
                    mask=mask, other=0.0).to(tl.float32)
        _rows_quant(x, rows, cols, pid_k, M, K, q_ptr, s_ptr, stride_qm, stride_sm, EMULATE_RNE)
        amax_c = _nan_max(amax_c, _absmax(x, 0))
    st = amax_c
    for i in tl.static_range(0, 128, CHUNK):
        rows = pid_m * 128 + i + tl.arange(0, CHUNK)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk,
                    mask=mask, other=0.0).to(tl.float32)
        st = _cols_quant(x, amax_c, rows, cols, M, K, qt_ptr, stride_qtk, EMULATE_RNE)
    tl.store(st_ptr + cols * stride_stk + pid_m * stride_stm, tl.reshape(st, (128,)), mask=cols < K)


def _swiglu_grads(g_ptr, u_ptr, dh_ptr, rows, cols, M, I, stride_gm, stride_um, stride_dm,
                  EMULATE_RNE: tl.constexpr):
    """dg, du of h = silu(g) * u for a [CHUNK, 128] tile, in fp32, rounded to dh's dtype."""
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    r = rows[:, None].to(tl.int64)
    g = tl.load(g_ptr + r * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.load(dh_ptr + r * stride_dm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    dg = d * u * (sig * (1.0 + g * (1.0 - sig)))
    du = d * (g * sig)
    # The gradients are rounded to the activations' dtype first, as the unfused path stores
    # them. Triton's interpreter truncates in that conversion; the GPU rounds to nearest even,
    # which the interpreter run emulates on the bits for bf16 (the dtype the tests cover).
    if EMULATE_RNE and dh_ptr.dtype.element_ty == tl.bfloat16:
        dg = _round_to_bf16(dg)
        du = _round_to_bf16(du)
    else:
        dg = dg.to(dh_ptr.dtype.element_ty).to(tl.float32)
        du = du.to(dh_ptr.dtype.element_ty).to(tl.float32)
    return dg, du


def _round_to_bf16(v):
    """fp32 v rounded to the nearest bf16 value (ties to even), staying in fp32."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


def _swiglu_bwd_dual_kernel(g_ptr, u_ptr, dh_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, I, M_BUCKET,
                            stride_gm, stride_um, stride_dm, stride_qm, stride_sm, stride_qtk,
                            stride_stk, stride_stm, CHUNK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """One program: gate, up, dh [128 rows, 128 cols of I] -> dg and du, each in both layouts
    (dg in columns 0..I-1 of the [M, 2I] result, du in I..2I-1); two passes as above, the
    second recomputing dg and du from the cached inputs."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_k * 128 + tl.arange(0, 128)
    n_groups = I // 128
    amax_g = tl.zeros([128], dtype=tl.float32)
    amax_u = tl.zeros([128], dtype=tl.float32)
    for i in tl.static_range(0, 128, CHUNK):
        rows = pid_m * 128 + i + tl.arange(0, CHUNK)
        dg, du = _swiglu_grads(g_ptr, u_ptr, dh_ptr, rows, cols, M, I, stride_gm, stride_um, stride_dm, EMULATE_RNE)
        _rows_quant(dg, rows, cols, pid_k, M, 2 * I, q_ptr, s_ptr, stride_qm, stride_sm, EMULATE_RNE)
        _rows_quant(du, rows, cols + I, pid_k + n_groups, M, 2 * I, q_ptr, s_ptr, stride_qm, stride_sm, EMULATE_RNE)
        amax_g = _nan_max(amax_g, _absmax(dg, 0))
        amax_u = _nan_max(amax_u, _absmax(du, 0))
    sg = amax_g
    su = amax_u
    for i in tl.static_range(0, 128, CHUNK):
        rows = pid_m * 128 + i + tl.arange(0, CHUNK)
        dg, du = _swiglu_grads(g_ptr, u_ptr, dh_ptr, rows, cols, M, I, stride_gm, stride_um, stride_dm, EMULATE_RNE)
        sg = _cols_quant(dg, amax_g, rows, cols, M, 2 * I, qt_ptr, stride_qtk, EMULATE_RNE)
        su = _cols_quant(du, amax_u, rows, cols + I, M, 2 * I, qt_ptr, stride_qtk, EMULATE_RNE)
    tl.store(st_ptr + cols * stride_stk + pid_m * stride_stm, tl.reshape(sg, (128,)), mask=cols < I)
    tl.store(st_ptr + (cols + I) * stride_stk + pid_m * stride_stm, tl.reshape(su, (128,)), mask=cols < I)


# (CHUNK rows per step, num_warps), autotuned per (K, bucket of M) on the GPU
_CONFIGS = [(16, 4), (32, 4), (32, 8), (64, 8)]


def _kernels():
    """jit on first use, after quant.build() has imported Triton and jitted the shared helpers."""
    global _KERNELS, tl, _absmax, _quant_tile, _rows_quant, _cols_quant, _nan_max, _swiglu_grads, _round_to_bf16
    if _KERNELS is None:
        built = quant.build()
        triton = built.triton
        tl, _absmax, _quant_tile = built.tl, quant._absmax, quant._quant_tile
        _rows_quant, _cols_quant, _nan_max = triton.jit(_rows_quant), triton.jit(_cols_quant), triton.jit(_nan_max)
        _swiglu_grads, _round_to_bf16 = triton.jit(_swiglu_grads), triton.jit(_round_to_bf16)
        kernels = [triton.jit(_dual_quant_kernel), triton.jit(_swiglu_bwd_dual_kernel)]
        if not built.interpret:  # outputs are only written, so re-running a config is harmless
            configs = [triton.Config({"CHUNK": c}, num_warps=w) for c, w in _CONFIGS]
            kernels = [triton.autotune(configs=configs, key=["K" if i == 0 else "I", "M_BUCKET"])(k)
                       for i, k in enumerate(kernels)]
        _KERNELS = (built, *kernels)
    return _KERNELS


def _tile(built) -> dict:
    """Launch options: fixed under the interpreter, autotuned (nothing to pass) on the GPU."""
    return dict(CHUNK=32, num_warps=4) if built.interpret else {}


def _outputs(m: int, k: int, device):
    """q [M, K], s [M, K/128], q_t [K, M], s_t [K, M/128] as the single-layout kernels lay them
    out (s_t a transposed view with strides (1, K))."""
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=device)
    s = torch.empty(m, cdiv(k, BLOCK), dtype=torch.float32, device=device)
    qt = torch.empty(k, m, dtype=FP8_DTYPE, device=device)
    st = torch.empty(cdiv(m, BLOCK), k, dtype=torch.float32, device=device).t()
    return q, s, qt, st


def act_quant_dual_triton(x: torch.Tensor):
    """x [M, K] -> (q, s, q_t, s_t): `act_quant(x)` and `act_quant_t(x)` in one read of x."""
    if x.dim() != 2:
        raise ValueError(f"act_quant_dual takes a 2-D tensor, got shape {tuple(x.shape)}")
    quant.require_triton(x)
    built, kernel, _ = _kernels()
    m, k = x.shape
    q, s, qt, st = _outputs(m, k, x.device)
    if m and k:
        kernel[(cdiv(k, BLOCK), cdiv(m, BLOCK))](
            x, q, s, qt, st, m, k, quant.m_bucket(m), x.stride(0), x.stride(1), q.stride(0), s.stride(0),
            qt.stride(0), st.stride(0), st.stride(1), EMULATE_RNE=built.interpret, **_tile(built))
    return q, s, qt, st


def swiglu_backward_dual_quant_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """[dg | du] of h = silu(gate) * up, quantised both ways, never stored in high precision:
    (q [M, 2I], s, q_t [2I, M], s_t). gate and up may be strided views with unit column stride
    (the halves of one [M, 2I] GEMM output); I must be a multiple of 128."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.shape != dh.shape:
        raise ValueError(f"gate, up and dh must share one [M, I] shape, got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)} and {tuple(dh.shape)}")
    m, i = gate.shape
    if i % BLOCK:
        raise ValueError(f"I={i} is not a multiple of 128: a quantisation group would straddle dg and du")
    if any(t.stride(1) != 1 for t in (gate, up, dh)):
        raise ValueError("gate, up and dh need unit stride along I")
    quant.require_triton(gate, up, dh)
    built, _, kernel = _kernels()
    q, s, qt, st = _outputs(m, 2 * i, dh.device)
    if m and i:
        kernel[(i // BLOCK, cdiv(m, BLOCK))](
            gate, up, dh, q, s, qt, st, m, i, quant.m_bucket(m), gate.stride(0), up.stride(0), dh.stride(0),
            q.stride(0), s.stride(0), qt.stride(0), st.stride(0), st.stride(1), EMULATE_RNE=built.interpret,
            **_tile(built))
    return q, s, qt, st


def act_quant_dual(x: torch.Tensor):
    """(q, s, q_t, s_t) = act_quant(x) + act_quant_t(x): one Triton pass on CUDA, else torch."""
    if quant._use_triton(x):
        return act_quant_dual_triton(x)
    return (*ref.act_quant(x), *ref.act_quant_t(x))


def swiglu_backward_dual_quant(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """act_quant and act_quant_t of the SwiGLU input gradient [dg | du]: fused on CUDA when I is a
    multiple of 128 and the inputs have unit column stride, else the gradient is formed first."""
    fused = (quant._use_triton(gate, up, dh) and gate.shape[-1] % BLOCK == 0
             and all(t.stride(-1) == 1 for t in (gate, up, dh)))
    if fused:
        return swiglu_backward_dual_quant_triton(gate, up, dh)
    return act_quant_dual(swiglu_backward(gate, up, dh))
