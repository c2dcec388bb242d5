"""MLA's attention inputs in one pass: rotate the rope parts and lay out q, k, v for SDPA.

Training MLA (`attention.MLA._naive`) turns the projections into per-head tensors:
    q = [q_nope | rope(q_pe)]                    from q_proj's output [B, T, H, nope + rope]
    k = [k_nope | rope(k_pe) for every head]     k_nope from kv_b_proj's [B, T, H, nope + v],
                                                 k_pe [B, T, rope] shared by the heads
    v = the last v columns of kv_b_proj's output
`rope` rotates adjacent pairs in float32 and rounds once (rope.apply_rope). With torch ops that is
about twenty kernels forward (float32 copies, the rotation, stack, two concatenations, the
broadcast of k_pe) and more backward (the concatenations' slices, the sum of k_pe's gradient
over heads, a zero-filled gradient for the split of kv). One program per token does it here:
forward writes q, k and v; backward writes dq, d(kv) = [dk_nope | dv] and dk_pe (summed over
heads in float32).

`mla_qkv` (autograd) dispatches: Triton on CUDA, the torch composition elsewhere (the tests run
the kernels under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import torch

from ..rope import apply_rope
from .quant import _use_triton, jit_kernels, require_triton

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None


def mla_qkv_reference(q_BTHK, kv_BTHC, k_pe_BTR, cos, sin, nope_dim: int):
    """(q, k, v) [B, T, H, *] with the torch ops: rope in float32, concatenations."""
    B, T, H, _ = q_BTHK.shape
    rope_dim = k_pe_BTR.shape[-1]
    q_nope, q_pe = q_BTHK.split([nope_dim, rope_dim], dim=-1)
    k_nope, v = kv_BTHC.split([nope_dim, kv_BTHC.shape[-1] - nope_dim], dim=-1)
    q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
    k_pe = apply_rope(k_pe_BTR, cos, sin)
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, rope_dim)], dim=-1)
    return q, k, v


def _rotate(x, cos, sin, BLOCK_HALF: tl.constexpr, inverse: tl.constexpr):
    """Rotate adjacent pairs of x [rows, 2 * BLOCK_HALF] (float32) by the angles whose cos/sin
    are [1, BLOCK_HALF]; inverse applies the transposed rotation (the backward's)."""
    rows: tl.constexpr = x.shape[0]
    even, odd = tl.split(tl.reshape(x, [rows, BLOCK_HALF, 2]))
    if inverse:
        out_even, out_odd = even * cos + odd * sin, odd * cos - even * sin
    else:
        out_even, out_odd = even * cos - odd * sin, odd * cos + even * sin
    return tl.reshape(tl.join(out_even, out_odd), [rows, 2 * BLOCK_HALF])


def _fwd_kernel(q_ptr, kv_ptr, kpe_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, H,
                s_qt, s_qh, s_kvt, s_kvh, s_pet, s_cst,
                NOPE: tl.constexpr, HALF: tl.constexpr, VDIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per token (b*T + t): all heads, BLOCK_H at a time. Outputs are contiguous
    [B*T, H, *]; inputs may be strided over tokens and heads (views of the projections). The
    rope columns are read and written contiguously and paired in registers (split / join)."""
    tok = tl.program_id(0).to(tl.int64)
    QK: tl.constexpr = NOPE + 2 * HALF
    cn, cv = tl.arange(0, BLOCK_NOPE)[None, :], tl.arange(0, BLOCK_V)[None, :]
    cr, cp = tl.arange(0, BLOCK_HALF), tl.arange(0, 2 * BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + tok * s_cst + cr, mask=cr < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + tok * s_cst + cr, mask=cr < HALF, other=0.0).to(tl.float32)[None, :]
    k_pe = tl.load(kpe_ptr + tok * s_pet + cp, mask=cp < 2 * HALF, other=0.0).to(tl.float32)
    k_pe = _rotate(k_pe, cos, sin, BLOCK_HALF, False).to(ko_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[:, None]
        hm = h < H
        q_row = q_ptr + tok * s_qt + h * s_qh
        kv_row = kv_ptr + tok * s_kvt + h * s_kvh
        out_q = qo_ptr + (tok * H + h) * QK
        out_k = ko_ptr + (tok * H + h) * QK
        mn, mp, mv = hm & (cn < NOPE), hm & (cp < 2 * HALF), hm & (cv < VDIM)
        tl.store(out_q + cn, tl.load(q_row + cn, mask=mn), mask=mn)
        q_pe = tl.load(q_row + NOPE + cp, mask=mp, other=0.0).to(tl.float32)
        tl.store(out_q + NOPE + cp, _rotate(q_pe, cos, sin, BLOCK_HALF, False).to(qo_ptr.dtype.element_ty), mask=mp)
        tl.store(out_k + cn, tl.load(kv_row + cn, mask=mn), mask=mn)
        tl.store(out_k + NOPE + cp, tl.zeros([BLOCK_H, 2 * BLOCK_HALF], dtype=ko_ptr.dtype.element_ty) + k_pe, mask=mp)
        tl.store(vo_ptr + (tok * H + h) * VDIM + cv, tl.load(kv_row + NOPE + cv, mask=mv), mask=mv)


def _bwd_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqi_ptr, dkv_ptr, dpe_ptr, H,
                s_dqt, s_dqh, s_dkt, s_dkh, s_dvt, s_dvh, s_cst,
                NOPE: tl.constexpr, HALF: tl.constexpr, VDIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per token: dq (rotation transposed), d(kv) = [dk_nope | dv] and dk_pe, the
    transposed rotation of dk's rope part summed over heads in float32. Outputs contiguous."""
    tok = tl.program_id(0).to(tl.int64)
    QK: tl.constexpr = NOPE + 2 * HALF
    KV: tl.constexpr = NOPE + VDIM
    cn, cv = tl.arange(0, BLOCK_NOPE)[None, :], tl.arange(0, BLOCK_V)[None, :]
    cr, cp = tl.arange(0, BLOCK_HALF), tl.arange(0, 2 * BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + tok * s_cst + cr, mask=cr < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + tok * s_cst + cr, mask=cr < HALF, other=0.0).to(tl.float32)[None, :]
    dpe = tl.zeros([1, 2 * BLOCK_HALF], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[:, None]
        hm = h < H
        mn, mp, mv = hm & (cn < NOPE), hm & (cp < 2 * HALF), hm & (cv < VDIM)
        g_q = dq_ptr + tok * s_dqt + h * s_dqh
        g_k = dk_ptr + tok * s_dkt + h * s_dkh
        out_q = dqi_ptr + (tok * H + h) * QK
        out_kv = dkv_ptr + (tok * H + h) * KV
        tl.store(out_q + cn, tl.load(g_q + cn, mask=mn), mask=mn)
        dq_pe = tl.load(g_q + NOPE + cp, mask=mp, other=0.0).to(tl.float32)
        tl.store(out_q + NOPE + cp, _rotate(dq_pe, cos, sin, BLOCK_HALF, True).to(dqi_ptr.dtype.element_ty), mask=mp)
        tl.store(out_kv + cn, tl.load(g_k + cn, mask=mn), mask=mn)
        tl.store(out_kv + NOPE + cv, tl.load(dv_ptr + tok * s_dvt + h * s_dvh + cv, mask=mv), mask=mv)
        dk_pe = tl.load(g_k + NOPE + cp, mask=mp, other=0.0).to(tl.float32)
        dpe += tl.sum(_rotate(dk_pe, cos, sin, BLOCK_HALF, True), axis=0)[None, :]
    tl.store(dpe_ptr + tok * 2 * HALF + cp, dpe.to(dpe_ptr.dtype.element_ty), mask=cp < 2 * HALF)


def _kernels():
    """jit the kernels on first use (quant.jit_kernels: Triton is imported only then)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), ("_rotate",), ("_fwd_kernel", "_bwd_kernel"))
    return _KERNELS


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _meta(H: int, nope: int, half: int, vdim: int) -> dict:
    return dict(NOPE=nope, HALF=half, VDIM=vdim, BLOCK_H=min(_pow2(H), 16), BLOCK_NOPE=_pow2(nope),
                BLOCK_HALF=_pow2(half), BLOCK_V=_pow2(vdim), num_warps=4)


def _token_strides(t: torch.Tensor) -> tuple[int, int]:
    """(token, head) strides of a [B, T, H, *] view whose tokens flatten (B * T) with one stride."""
    B, T = t.shape[:2]
    if B > 1 and T > 1 and t.stride(0) != T * t.stride(1):
        raise ValueError("mla_qkv inputs must have their B and T dims flattenable into one token dim")
    if t.stride(-1) != 1:
        raise ValueError("mla_qkv inputs must be contiguous along their last dim")
    return t.stride(1) if T > 1 else t.stride(0), t.stride(2) if t.dim() == 4 else 0


def _check(q, kv, k_pe, cos, sin, nope_dim):
    B, T, H, qk = q.shape
    rope = k_pe.shape[-1]
    if kv.shape[:3] != (B, T, H) or k_pe.shape != (B, T, rope) or qk != nope_dim + rope or rope % 2:
        raise ValueError(f"mla_qkv shapes do not fit: q {tuple(q.shape)}, kv {tuple(kv.shape)}, "
                         f"k_pe {tuple(k_pe.shape)}, nope_dim {nope_dim}")
    if cos.shape[-1] != rope // 2 or sin.shape != cos.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) \
            or cos.shape[1] != T:
        raise ValueError(f"cos/sin must be [B or 1, T, rope/2] = {(B, T, rope // 2)}, got {tuple(cos.shape)}")


class _MLAQKVFn(torch.autograd.Function):
    """q, k, v for SDPA from the projections, with the Triton kernels; saves cos and sin only."""

    @staticmethod
    def forward(ctx, q, kv, k_pe, cos, sin, nope_dim):
        _check(q, kv, k_pe, cos, sin, nope_dim)
        require_triton(q, kv, k_pe, cos, sin)
        B, T, H, qk = q.shape
        half, vdim = k_pe.shape[-1] // 2, kv.shape[-1] - nope_dim
        cos, sin = (c.expand(B, T, half).contiguous() for c in (cos, sin))
        q_out = torch.empty(B, T, H, qk, dtype=q.dtype, device=q.device)
        k_out = torch.empty(B, T, H, qk, dtype=kv.dtype, device=q.device)
        v_out = torch.empty(B, T, H, vdim, dtype=kv.dtype, device=q.device)
        if B * T:
            _kernels()[0][(B * T,)](q, kv, k_pe, cos, sin, q_out, k_out, v_out, H,
                                    *_token_strides(q), *_token_strides(kv), _token_strides(k_pe)[0],
                                    half, **_meta(H, nope_dim, half, vdim))
        ctx.save_for_backward(cos, sin)
        ctx.dims = (nope_dim, half, vdim, k_pe.dtype)
        return q_out, k_out, v_out

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        nope_dim, half, vdim, pe_dtype = ctx.dims
        B, T, H, qk = dq.shape
        dq, dk, dv = (g.contiguous() if g.stride(-1) != 1 else g for g in (dq, dk, dv))
        dq_in = torch.empty(B, T, H, qk, dtype=dq.dtype, device=dq.device)
        dkv = torch.empty(B, T, H, nope_dim + vdim, dtype=dk.dtype, device=dq.device)
        dpe = torch.empty(B, T, 2 * half, dtype=pe_dtype, device=dq.device)
        if B * T:
            _kernels()[1][(B * T,)](dq, dk, dv, cos, sin, dq_in, dkv, dpe, H,
                                    *_token_strides(dq), *_token_strides(dk), *_token_strides(dv), half,
                                    **_meta(H, nope_dim, half, vdim))
        return dq_in, dkv, dpe, None, None, None


def mla_qkv(q_BTHK, kv_BTHC, k_pe_BTR, cos, sin, nope_dim: int):
    """(q, k, v) [B, T, H, *] for SDPA: q = [q_nope | rope(q_pe)], k = [k_nope | rope(k_pe)]
    (k_pe shared by the heads), v = kv's last columns. Fused Triton passes on CUDA, torch ops
    elsewhere."""
    if not _use_triton(q_BTHK, kv_BTHC, k_pe_BTR):
        return mla_qkv_reference(q_BTHK, kv_BTHC, k_pe_BTR, cos, sin, nope_dim)
    return _MLAQKVFn.apply(q_BTHK, kv_BTHC, k_pe_BTR, cos, sin, nope_dim)
