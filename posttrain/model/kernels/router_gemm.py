"""The router's GEMMs with bf16 operands and float32 products, sums and output.

The reference computes the router logits as F.linear(x.float(), W.float()). For bf16 x and W
every product is exact in float32, so a bf16 tensor-core GEMM that accumulates and writes in
float32 computes the same numbers up to the order of the sum, without the float32 copy of x
and without cuBLAS's float32 (non tensor-core) GEMM, which on an H100 is several times slower
on these thin shapes ([tokens, 2048] x [2048, 64]). torch has no fast bf16-in, float32-out GEMM
here, so `mm_f32` is one small Triton kernel: tiles of [BLOCK_M, BLOCK_N] accumulate in float32
over K; a long K is split over programs that each write a float32 partial, summed by torch in a
fixed order (deterministic, unlike atomics).

The backward's logits gradient is float32. It is split into bf16 hi + lo (d = hi + lo to about
2^-17 relative), so its products with bf16 operands run on tensor cores too, still summing in
float32 (`MoE`'s `_RouterLogits`).
"""

from __future__ import annotations

import torch

from .quant import _use_triton, jit_kernels, require_triton
from .reference import cdiv

tl = None  # bound by _kernels(); the kernel body looks it up as a module global
_KERNELS = None
# Programs to aim for when K is split (an H100 has 132 SMs).
_TARGET_PROGRAMS = 264


def mm_f32_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float() @ b.float()


def _mm_f32_kernel(a_ptr, b_ptr, c_ptr, M, N, K, k_per_split, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cs, stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """One program: c[split, tile] = a[tile rows, its K range] @ b[its K range, tile cols], float32."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        rk = (k + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < k_end), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < k_end) & (rn[None, :] < N), other=0.0)
        if DOT_F32:  # the interpreter's dot multiplies bf16 bit patterns; bf16 products are exact in fp32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + split.to(tl.int64) * stride_cs + rm[:, None] * stride_cm + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), (), ("_mm_f32_kernel",))
    return _KERNELS


def _tiles(M: int, N: int, K: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits of K): enough programs to fill the GPU, K split only
    when the output has too few tiles for that (the weight gradient: [2E, D] over all tokens)."""
    if interpret:
        return 16, 16, 16, 2 if K > 32 else 1
    bm, bn, bk = 64, (64 if N <= 64 else 128), 64
    tiles = cdiv(M, bm) * cdiv(N, bn)
    splits = 1 if tiles >= _TARGET_PROGRAMS // 2 else min(cdiv(_TARGET_PROGRAMS, tiles), max(1, K // (8 * bk)))
    return bm, bn, bk, splits


def mm_f32_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] (bf16 or fp16, any strides) -> float32 [M, N], summed in float32."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm_f32 wants a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mm_f32 wants two bf16 or two fp16 operands, got {a.dtype} and {b.dtype}")
    built = require_triton(a, b)
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=torch.float32, device=a.device)
    bm, bn, bk, splits = _tiles(M, N, K, built.interpret)
    k_per_split = cdiv(cdiv(K, splits), bk) * bk
    splits = cdiv(K, k_per_split)
    out = torch.empty(splits, M, N, dtype=torch.float32, device=a.device)
    _kernels()[0][(cdiv(M, bm), cdiv(N, bn), splits)](
        a, b, out, M, N, K, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_F32=built.interpret, num_warps=4)
    return out[0] if splits == 1 else out.sum(0)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 from bf16/fp16 operands: the Triton kernel on CUDA, torch elsewhere."""
    if _use_triton(a, b) and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return mm_f32_triton(a, b)
    return mm_f32_reference(a, b)
