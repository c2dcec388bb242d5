"""Plain torch references for the blockwise FP8 kernels (the CPU path, and what tests compare to).

Conventions shared by every kernel in this package:

* FP8 is e4m3 (`torch.float8_e4m3fn`, largest finite value 448).
* A scale is the fp32 *dequantisation* multiplier, x ~= q.float() * s, as the checkpoint's
  `weight_scale_inv` and `torch._scaled_mm`'s scale arguments are. It is amax / 448 of its
  tile, amax clamped to >= 1e-12 so that an all-zero tile gives q = 0 and a finite scale.
* q = clamp(x / s, -448, 448) rounded to nearest-even e4m3, with an IEEE division (not a
  multiplication by 448 / amax): that is what `fp8.weight_quant` (the checkpoint format) does,
  and the Triton kernels reproduce it bit for bit.
* Activations: 1x128 tiles along the last dim (a ragged last tile is quantised on its own).
  Weights: 128x128 blocks. The transposed activation quantisation `act_quant_t` quantises
  x.T in 1x128 tiles, i.e. tiles of 128 along M of x; it feeds the weight-gradient GEMM,
  where tokens are the contraction dim.
* GEMM: c = a @ b.T with a [M, K], b [N, K]; per 128-wide K block the fp32 partial product
  is multiplied by a's row scale and b's (row or block) scale before it is accumulated: the
  DeepSeek-V3 report's "promotion to fp32 every 128 of K".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fp8 as _fp8

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-12


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] float -> (e4m3 [R, K], fp32 scale [R, ceil(K/128)]), one scale per 1x128 tile."""
    rows, k = x.shape
    nb = cdiv(k, BLOCK)
    xf = x.float()
    if k % BLOCK:  # zero padding never raises a tile's amax
        xf = F.pad(xf, (0, nb * BLOCK - k))
    tiles = xf.view(rows, nb, BLOCK)
    s = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (tiles / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rows, nb * BLOCK)[:, :k].contiguous(), s


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, s [..., ceil(K/128)] fp32), 1x128 tiles along K."""
    k = x.shape[-1]
    q, s = _quant_rows(x.reshape(-1, k))
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def act_quant_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q_t [K, M] e4m3, s_t [K, ceil(M/128)] fp32): the 1x128 quantisation of x.T.

    s_t is the transpose of a contiguous [ceil(M/128), K] tensor (strides (1, K)): the
    weight-gradient GEMMs then read each 128-token block's scales contiguously.

    Written on x's own layout (tiles of 128 rows, amax over dim 0), not as act_quant(x.T), so
    that the test comparing the two checks something.
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant_t takes a 2-D tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    nb = cdiv(m, BLOCK)
    xf = x.float()
    if m % BLOCK:
        xf = F.pad(xf, (0, 0, 0, nb * BLOCK - m))
    tiles = xf.view(nb, BLOCK, k)
    s = tiles.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / FP8_MAX  # [nb, K]
    q = (tiles / s[:, None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q_t = q.view(nb * BLOCK, k)[:m].t().contiguous()
    return q_t, s.t()


def swiglu(gate: torch.Tensor, up: torch.Tensor, row_w: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up in fp32 (the fused kernel never rounds the product to bf16), each row of
    the [M, I] product times row_w[row] when given."""
    h = F.silu(gate.float()) * up.float()
    if row_w is None:
        return h
    if gate.dim() != 2 or row_w.shape != gate.shape[:1]:
        raise ValueError(f"row weights need [M, I] inputs and [M] weights, got {tuple(gate.shape)} "
                         f"and {tuple(row_w.shape)}")
    return h * row_w.float()[:, None]


def swiglu_act_quant(gate: torch.Tensor, up: torch.Tensor,
                     row_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) [..., I] -> act_quant((row_w *) silu(gate) * up) with the product kept in fp32."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return act_quant(swiglu(gate, up, row_w))


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] or stacked [E, N, K] -> (q, s [..., ceil(N/128), ceil(K/128)]), 128x128 blocks.

    The 2-D case is `fp8.weight_quant` itself (the checkpoint format); experts are quantised
    one by one, so no block ever spans two experts.
    """
    if w.dim() == 2:
        return _fp8.weight_quant(w)
    if w.dim() != 3:
        raise ValueError(f"weight_quant takes [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    if w.shape[0] == 0:
        n, k = w.shape[1:]
        return (torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device),
                torch.empty(0, cdiv(n, BLOCK), cdiv(k, BLOCK), dtype=torch.float32, device=w.device))
    qs, ss = zip(*(_fp8.weight_quant(w[e]) for e in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


def weight_quant_t(ws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked weights [E, N_i, K] concatenated along N -> (q, s, q_t, s_t): the 128x128
    quantisation of the concatenation and its transpose ([E, K, N], [E, K/128, N/128])."""
    if not ws or any(w.dim() != 3 for w in ws):
        raise ValueError(f"expected stacked weights [E, N_i, K], got {[tuple(w.shape) for w in ws]}")
    if any(w.shape[1] % BLOCK for w in ws[:-1]):
        # blocks would straddle two weights: quantise the concatenation itself
        q, s = weight_quant(torch.cat(ws, 1))
    else:
        parts = [weight_quant(w) for w in ws]
        q, s = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    return q, s, q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()


def resolve_b_block(b_q: torch.Tensor, b_s: torch.Tensor, b_block: bool | None) -> bool:
    """Whether b's scale is 128x128 blockwise (True) or 1x128 rowwise (False), checking shapes.

    The shapes differ unless N == 1, where both readings scale the single row per 128 of K
    alike, so None is never truly ambiguous; an explicit b_block is still checked.
    """
    n, k = b_q.shape
    kb = cdiv(k, BLOCK)
    block_shape, row_shape = (cdiv(n, BLOCK), kb), (n, kb)
    shape = tuple(b_s.shape)
    if b_block is None:
        if shape == block_shape:
            return True
        if shape == row_shape:
            return False
    elif shape == (block_shape if b_block else row_shape):
        return bool(b_block)
    want = {True: block_shape, False: row_shape}
    expected = (f"{want[True]} (128x128) or {want[False]} (1x128)" if b_block is None
                else f"{want[bool(b_block)]}")
    raise ValueError(f"b_s has shape {shape}; b [{n}, {k}] needs {expected}")


def check_gemm_args(a_q, a_s, b_q, b_s) -> tuple[int, int, int]:
    """Shapes and dtypes every GEMM entry point requires; returns (M, N, K)."""
    if a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"fp8 GEMM takes 2-D operands, got a {tuple(a_q.shape)} and b {tuple(b_q.shape)}")
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 GEMM operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise ValueError(f"fp8 GEMM scales must be float32, got {a_s.dtype} and {b_s.dtype}")
    m, k = a_q.shape
    n, kk = b_q.shape
    if k != kk:
        raise ValueError(f"a [{m}, {k}] and b [{n}, {kk}] do not share K (c = a @ b.T)")
    if tuple(a_s.shape) != (m, cdiv(k, BLOCK)):
        raise ValueError(f"a_s has shape {tuple(a_s.shape)}; a [{m}, {k}] needs ({m}, {cdiv(k, BLOCK)})")
    return m, n, k


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, b_block: bool | None = None) -> torch.Tensor:
    """c [M, N] = a @ b.T, dequantised one 128-wide K block at a time, accumulated in fp32.

    Each block's partial product is scaled as (dot * a_s[:, k, None]) * b_s[None, :] in that
    order, as the Triton kernel does, so the two differ only in the fp32 summation order
    inside a block.
    """
    m, n, k = check_gemm_args(a_q, a_s, b_q, b_s)
    blockwise = resolve_b_block(b_q, b_s, b_block)
    acc = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for kb in range(cdiv(k, BLOCK)):
        lo, hi = kb * BLOCK, min(k, (kb + 1) * BLOCK)
        part = a_q[:, lo:hi].float() @ b_q[:, lo:hi].float().t()
        sb = b_s[:, kb].repeat_interleave(BLOCK)[:n] if blockwise else b_s[:, kb]
        acc += part * a_s[:, kb, None] * sb[None, :]
    return acc.to(out_dtype)
