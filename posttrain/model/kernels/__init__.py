"""Blockwise FP8 kernels for training: quantisation and GEMMs (Triton / cuBLAS on CUDA, torch
references on CPU). Conventions are documented in `reference.py`.

Device-agnostic entry points (Triton or cuBLAS on CUDA, the torch references elsewhere):
`act_quant`, `act_quant_t`, `swiglu_act_quant`, `weight_quant`, `weight_quant_t`, `fp8_matmul`.
Single implementations: `reference.*` (torch), `*_triton` (Triton; they raise a clear error
without Triton), `scaled_mm_blockwise` (cuBLAS through torch._scaled_mm). The Triton GEMM is
`fp8_gemm_triton` here: the name `fp8_gemm` stays the submodule (`fp8_gemm.fp8_gemm` is the
function). Importing this package neither needs nor imports Triton; kernels are built on
first use.
"""

from . import reference
from . import fp8_gemm  # the module; its Triton GEMM is exported as fp8_gemm_triton
from .fp8_gemm import (ScaledMMUnsupported, cublas_blockwise_works, fp8_matmul, scaled_mm_blockwise,
                       scaled_mm_unsupported_reason)
from .fp8_gemm import fp8_gemm as fp8_gemm_triton
from .quant import (HAVE_TRITON, act_quant, act_quant_t, act_quant_t_triton, act_quant_triton,
                    swiglu_act_quant, swiglu_act_quant_t, swiglu_act_quant_t_triton, swiglu_act_quant_triton,
                    weight_quant, weight_quant_t,
                    weight_quant_t_triton, weight_quant_triton)
# grouped (per-expert) GEMMs
from . import grouped
from .grouped import (grouped_fp8, grouped_fp8_wgrad, PaddedLayout, check_fp8_wgrad_offsets, grouped_gemm, grouped_gemm_fp8,
                           grouped_gemm_fp8_reference, grouped_gemm_reference, grouped_gemm_wgrad,
                           grouped_gemm_wgrad_fp8, grouped_gemm_wgrad_fp8_reference,
                           grouped_gemm_wgrad_reference, pad_offsets_to)

__all__ = [
    "reference", "HAVE_TRITON",
    "act_quant", "act_quant_t", "swiglu_act_quant", "weight_quant", "weight_quant_t", "fp8_matmul",
    "act_quant_triton", "act_quant_t_triton", "swiglu_act_quant_triton", "weight_quant_triton",
    "weight_quant_t_triton", "swiglu_act_quant_t", "swiglu_act_quant_t_triton",
    "fp8_gemm_triton", "scaled_mm_blockwise", "scaled_mm_unsupported_reason", "ScaledMMUnsupported",
    "cublas_blockwise_works",
    # grouped
    "grouped", "grouped_fp8", "grouped_fp8_wgrad",
    "grouped_gemm", "grouped_gemm_fp8", "grouped_gemm_wgrad", "grouped_gemm_wgrad_fp8",
    "grouped_gemm_reference", "grouped_gemm_fp8_reference", "grouped_gemm_wgrad_reference",
    "grouped_gemm_wgrad_fp8_reference", "pad_offsets_to", "PaddedLayout", "check_fp8_wgrad_offsets",
]
