"""Blockwise FP8 GEMM c = a @ b.T: a Triton kernel, cuBLAS through `torch._scaled_mm`, and
`fp8_matmul`, which picks one. Conventions (scales, tiles, promotion): see `reference.py`.

a [M, K] e4m3 with 1x128 scales a_s [M, ceil(K/128)]; b [N, K] e4m3 with either 128x128
scales [ceil(N/128), ceil(K/128)] (a weight: forward and input-gradient GEMMs) or 1x128 scales
[N, ceil(K/128)] (an activation: the weight-gradient GEMM). Operands may be strided views,
e.g. the input gradient dy @ W passes b = W_q.t() with b_s = W_s.t().

The Triton kernel fixes BLOCK_K = 128 so that each K step is exactly one scale block: the
fp32 result of `tl.dot` for that block is multiplied by a's row scales and b's column scales
and added to an fp32 accumulator (the report's promotion every 128 of K; Hopper's FP8 tensor
cores accumulate with reduced precision inside one dot, so the promotion bounds that error
to 128 products). Tiles are visited in groups of GROUP_M row tiles so that neighbouring
programs share b's column tiles in L2.
"""

from __future__ import annotations

import warnings

import torch

from . import reference as ref
from . import selection
from .quant import HAVE_TRITON, build, m_bucket, require_triton
from .reference import BLOCK, cdiv

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper. An fp8 operand tile of 128 x 128 is
# 16 KiB, so every config's pipeline stays well inside the 228 KiB of shared memory. Each
# K step holds the fp32 accumulator and the fp32 result of that step's dot at once, so tiles
# keep BLOCK_M * BLOCK_N / (32 * num_warps) <= 64 accumulator registers per thread (128 x 256
# on 8 warps would need 2 x 128 and spill).
_GEMM_CONFIGS = [
    (128, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4),
    (64, 64, 4, 4), (64, 256, 8, 3), (256, 64, 8, 3),
]
_GROUP_M = 8

tl = None  # triton.language, bound by `_gemm_kernels()` before the kernel is first compiled


def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_ask, stride_bsn, stride_bsk,
                     B_BLOCKWISE: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles sweep the column tiles together (L2 reuse of b)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    # rows past M / N wrap onto valid rows so that loads need no M / N mask; stores are masked
    rm = offs_m % M
    rn = offs_n % N
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
    as_ptrs = as_ptr + rm * stride_asm
    if B_BLOCKWISE:
        bs_ptrs = bs_ptr + (rn // 128) * stride_bsn
    else:
        bs_ptrs = bs_ptr + rn * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, 128)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kb * 128
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        sa = tl.load(as_ptrs + kb * stride_ask)
        sb = tl.load(bs_ptrs + kb * stride_bsk)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += 128 * stride_ak
        b_ptrs += 128 * stride_bk

    c = acc.to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_GEMM_KERNELS: tuple | None = None


def _gemm_kernels():
    """(plain jit kernel, autotuned kernel), built on first use like the quantisation kernels."""
    global _GEMM_KERNELS, tl
    if _GEMM_KERNELS is None:
        built = build()
        tl, triton = built.tl, built.triton
        kernel = triton.jit(_fp8_gemm_kernel)
        tuned = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": _GROUP_M}, num_warps=w, num_stages=s)
                     for bm, bn, w, s in _GEMM_CONFIGS],
            key=["M_BUCKET", "N", "K", "B_BLOCKWISE", "stride_ak", "stride_bk"],
        )(kernel)
        _GEMM_KERNELS = (kernel, tuned)
    return _GEMM_KERNELS


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, b_block: bool | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Triton blockwise FP8 GEMM: c [M, N] = a @ b.T in `out_dtype`, fp32 accumulation.

    Any strides are accepted (pass views, not copies). Hopper's FP8 tensor cores read K-major
    operands; a b whose N is contiguous (W_q.t() in the input gradient) also compiles to wgmma
    (checked ahead of time for sm_90 with Triton 3.9) with a transpose in shared memory, which
    may cost speed: not timed yet. `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) pins
    one tile shape instead of autotuning (tests).
    """
    m, n, k = ref.check_gemm_args(a_q, a_s, b_q, b_s)
    blockwise = ref.resolve_b_block(b_q, b_s, b_block)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    built = require_triton(a_q, a_s, b_q, b_s)
    kernel, tuned = _gemm_kernels()
    c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    args = (a_q, b_q, c, a_s, b_s, m, n, k, m_bucket(m),
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), c.stride(0), c.stride(1),
            a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1))
    flags = dict(B_BLOCKWISE=blockwise, EVEN_K=k % BLOCK == 0)
    if config is None and not built.interpret:
        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
        tuned[grid](*args, **flags)
    else:
        bm, bn, warps, stages = config or (32, 32, 4, 1)
        kernel[(cdiv(m, bm) * cdiv(n, bn),)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=_GROUP_M,
                                             num_warps=warps, num_stages=stages)
    return c


# ----------------------------------------------------------------------------- cuBLAS

class ScaledMMUnsupported(RuntimeError):
    """torch._scaled_mm cannot run this blockwise GEMM here (device, library or shape)."""


def scaled_mm_unsupported_reason(a_q: torch.Tensor, b_q: torch.Tensor, b_block: bool,
                                 out_dtype: torch.dtype) -> str | None:
    """Why `scaled_mm_blockwise` would refuse these operands, or None if it accepts them."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if not (a_q.is_cuda and b_q.is_cuda):
        return "torch._scaled_mm blockwise scaling needs CUDA tensors"
    if torch.version.hip is not None:
        return "1x128 / 128x128 scaling is cuBLASLt-only (not ROCm)"
    major, _ = torch.cuda.get_device_capability(a_q.device)
    if major != 9:
        return f"1x128 / 128x128 scaling runs only on SM90 (Hopper); this device is SM{major}x"
    if out_dtype not in (torch.bfloat16, torch.float32):
        return f"out_dtype {out_dtype}: blockwise cuBLAS GEMMs are used for bfloat16 or float32 only"
    m, k = a_q.shape
    n = b_q.shape[0]
    if k % BLOCK:
        return f"K={k} is not a multiple of 128"
    if n % 16:
        return f"N={n} is not a multiple of 16"
    if m % 4:
        return f"M={m} is not a multiple of 4 (a_s's column stride would not be 16-byte aligned)"
    if b_block and (k // BLOCK) % 4 and not hasattr(torch.nn.functional, "scaled_mm"):
        return (f"K/128={k // BLOCK} is not a multiple of 4: cuBLASLt wants the 128x128 scale's "
                "leading dim 16-byte aligned, which torch._scaled_mm cannot pad (torch.nn.functional."
                "scaled_mm, torch >= 2.10, can)")
    return None


def _padded_block_scale(b_s: torch.Tensor) -> torch.Tensor:
    """The 128x128 scale b_s [N/128, K/128] as torch.nn.functional.scaled_mm wants it when K/128
    is not a multiple of 4: [round_up(K/128, 4), N/128], the transpose of a zero-padded row-major
    buffer (the padding is never read: the GEMM stops at K)."""
    nb, kb = b_s.shape
    buf = b_s.new_zeros(nb, (kb + 3) // 4 * 4)
    buf[:, :kb] = b_s
    return buf.t()


def scaled_mm_blockwise(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16, b_block: bool | None = None) -> torch.Tensor:
    """c = a @ b.T through cuBLASLt's blockwise FP8 GEMM (`torch._scaled_mm`, CUDA >= 12.9, SM90).

    Layouts, as torch's checks in aten/src/ATen/native/cuda/ScaledBlas.cpp require
    (`is_blockwise_1x128_scaling`, `is_blockwise_128x128_scaling`, `get_joint_scaling`, which
    tests the pair (a, scale_a) as given and (b.t(), scale_b.t()) for the second operand) and
    as test/test_scaled_matmul_cuda.py (test_scaled_mm_vs_emulated_block_wise) builds them:

    * mat_a = a_q [M, K] row-major; mat_b = b_q.contiguous().t(), i.e. [K, N] column-major
      (Hopper cuBLASLt takes only row-major x column-major, "TN").
    * scale_a, 1x128: shape [M, K/128] and "outer-dim-major", strides (1, M):
      a_s.t().contiguous().t().
    * scale_b, 128x128 (a weight): scale_b.t() must be [N/128, K/128] with strides (K/128, 1),
      so scale_b = b_s.contiguous().t() (shape [K/128, N/128]).
    * scale_b, 1x128 (an activation): scale_b.t() must be [N, K/128] with strides (1, N), so
      scale_b = b_s.t().contiguous() (shape [K/128, N], row-major).
    * Scales are the dequantisation multipliers (torch calls them "inverse scales"), as here.
    * torch requires K and N multiples of 16; the supported pairs are (1x128, 128x128),
      (1x128, 1x128) and (128x128, 1x128); SM90 only, cuBLASLt >= 12.9.

    Stricter than torch, to stay on layouts its tests exercise: K a multiple of 128 and M a
    multiple of 4. For 128x128 scales with K/128 not a multiple of 4 (K = 2816, the shared
    experts' width) cuBLASLt wants the scale's leading dim padded to 16 bytes: `_scaled_mm`
    cannot express that (on an H100 with torch 2.11 it runs and returns wrong results, relative
    error 0.3), so those calls go through `torch.nn.functional.scaled_mm` with the scale padded
    to [round_up(K/128, 4), N/128] (`_padded_block_scale`). Anything else raises
    `ScaledMMUnsupported` and `fp8_matmul` uses the Triton kernel instead. Non-contiguous
    operands are copied (b = W_q.t() in the input gradient costs one transpose of the FP8 weight).
    """
    m, n, k = ref.check_gemm_args(a_q, a_s, b_q, b_s)
    blockwise = ref.resolve_b_block(b_q, b_s, b_block)
    reason = scaled_mm_unsupported_reason(a_q, b_q, blockwise, out_dtype)
    if reason:
        raise ScaledMMUnsupported(f"blockwise torch._scaled_mm unavailable: {reason}")
    mat_a = a_q.contiguous()
    mat_b = b_q.contiguous().t()
    scale_a = a_s.t().contiguous().t()
    if blockwise and (k // BLOCK) % 4:
        F = torch.nn.functional
        return F.scaled_mm(mat_a, mat_b, scale_a, F.ScalingType.BlockWise1x128, _padded_block_scale(b_s),
                           F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    scale_b = b_s.contiguous().t() if blockwise else b_s.t().contiguous()
    return torch._scaled_mm(mat_a, mat_b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


_PROBED: dict[tuple[str, bool, bool], bool] = {}
PROBE_FAILURES: dict[tuple[str, bool, bool], str] = {}


def cublas_blockwise_works(device: torch.device, b_block: bool, padded_scale: bool = False) -> bool:
    """Probe once per (device, kind of b scale, padded 128x128 scale): run a small GEMM through
    cuBLAS and compare it with the torch reference; any error or disagreement means "use
    Triton". Cached; a failure is kept in PROBE_FAILURES and reported once as a RuntimeWarning
    (the Triton GEMM is slower, so a silent fallback would only show up as lost speed)."""
    key = (str(device), bool(b_block), bool(b_block and padded_scale))
    if key not in _PROBED:
        ok, why = False, ""
        try:
            g = torch.Generator(device="cpu").manual_seed(1234)
            m, n, k = 64, 256, (384 if key[2] else 512)  # K/128 = 3 takes the padded-scale path
            a = torch.randn(m, k, generator=g).to(device)
            b = torch.randn(n, k, generator=g).to(device)
            a_q, a_s = ref.act_quant(a)
            b_q, b_s = ref.weight_quant(b) if b_block else ref.act_quant(b)
            got = scaled_mm_blockwise(a_q, a_s, b_q, b_s, torch.float32, b_block).float()
            want = ref.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, b_block)
            err = float((got - want).norm() / want.norm())
            ok = bool(torch.isfinite(got).all()) and err <= 1e-3
            why = "" if ok else f"result differs from the reference (relative error {err:.2e})"
        except Exception as exc:  # noqa: BLE001 - any failure means the path is unusable here
            why = f"{type(exc).__name__}: {exc}"
        _PROBED[key] = ok
        if not ok:
            PROBE_FAILURES[key] = why
            kind = ("1x128 x 128x128" + (" (padded scale)" if key[2] else "")) if b_block else "1x128 x 1x128"
            warnings.warn(f"cuBLAS blockwise FP8 ({kind}) unusable on {device}, using the Triton GEMM: {why[:300]}",
                          RuntimeWarning, stacklevel=2)
    return _PROBED[key]


def _triton_gemm_works(device: torch.device) -> bool:
    return HAVE_TRITON and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, b_block: bool | None = None) -> torch.Tensor:
    """c = a @ b.T on whatever runs here: cuBLAS blockwise (probed once) on Hopper when the
    shape qualifies, else the Triton kernel on CUDA (SM89+), else the torch reference.

    The kernel selection (`train.kernels.fp8_gemm`, kernels/selection.py) may force one
    implementation (cublas, triton or torch; errors are not caught then).
    """
    mode = selection.active().fp8_gemm
    if mode == "torch":
        return ref.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, b_block)
    if mode == "triton":
        return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, b_block)
    if mode == "cublas":
        return scaled_mm_blockwise(a_q, a_s, b_q, b_s, out_dtype, b_block)
    if not a_q.is_cuda:
        return ref.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, b_block)
    ref.check_gemm_args(a_q, a_s, b_q, b_s)
    blockwise = ref.resolve_b_block(b_q, b_s, b_block)
    if (scaled_mm_unsupported_reason(a_q, b_q, blockwise, out_dtype) is None
            and cublas_blockwise_works(a_q.device, blockwise, padded_scale=(a_q.shape[1] // BLOCK) % 4 != 0)):
        return scaled_mm_blockwise(a_q, a_s, b_q, b_s, out_dtype, blockwise)
    if _triton_gemm_works(a_q.device):
        return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, blockwise)
    return ref.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, blockwise)


__all__ = ["fp8_gemm", "scaled_mm_blockwise", "scaled_mm_unsupported_reason", "ScaledMMUnsupported",
           "cublas_blockwise_works", "fp8_matmul"]
