"""Which cuBLAS blockwise FP8 layouts torch accepts on this GPU, checked against the reference.

    python benchmarks/probe_cublas_blockwise.py

cuBLASLt wants the 128x128 scale's leading dimension 16-byte aligned, so with K/128 not a
multiple of 4 (K = 2816: the shared experts' down projection forward and gate/up input
gradients) `scaled_mm_blockwise` refuses and the Triton GEMM runs. This tries the scale in a
padded buffer (a strided view) through torch._scaled_mm and through the newer
torch.nn.functional.scaled_mm, and the 1x128 x 1x128 weight-gradient call of the FP8 linear.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from posttrain.model import kernels as K  # noqa: E402
from posttrain.model.kernels import fp8_gemm as G  # noqa: E402
from posttrain.model.kernels import reference as ref  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


torch.manual_seed(0)
M, N, Kd = 16384, 2048, 2816
a = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) * 0.02
aq, a_s = K.act_quant(a)
wq, w_s = K.weight_quant(w)
want = ref.fp8_gemm(aq, a_s, wq, w_s, torch.float32, True)
kb, nb = w_s.shape[1], w_s.shape[0]
kpad = (kb + 3) // 4 * 4
buf = torch.zeros(nb, kpad, device="cuda")
buf[:, :kb] = w_s
padded = buf[:, :kb]                      # [N/128, K/128], row stride kpad
mat_a, mat_b = aq, wq.t()                 # [M, K] row-major, [K, N] column-major
scale_a = a_s.t().contiguous().t()        # [M, K/128], outer-dim-major
print("reason now:", G.scaled_mm_unsupported_reason(aq, wq, True, torch.bfloat16))
tries = {
    "_scaled_mm, exact scale_b": lambda: torch._scaled_mm(mat_a, mat_b, scale_a=scale_a, scale_b=w_s.contiguous().t(),
                                                          out_dtype=torch.bfloat16),
    "_scaled_mm, padded scale_b": lambda: torch._scaled_mm(mat_a, mat_b, scale_a=scale_a, scale_b=padded.t(),
                                                           out_dtype=torch.bfloat16),
}
F = torch.nn.functional
if hasattr(F, "scaled_mm"):
    ST = F.ScalingType
    tries["F.scaled_mm, exact scale_b"] = lambda: F.scaled_mm(mat_a, mat_b, scale_a, ST.BlockWise1x128,
                                                               w_s.contiguous().t(), ST.BlockWise128x128,
                                                               output_dtype=torch.bfloat16)
    tries["F.scaled_mm, padded scale_b"] = lambda: F.scaled_mm(mat_a, mat_b, scale_a, ST.BlockWise1x128, padded.t(),
                                                                ST.BlockWise128x128, output_dtype=torch.bfloat16)
tries["scaled_mm_blockwise (the FP8 linear's path)"] = lambda: G.scaled_mm_blockwise(aq, a_s, wq, w_s, torch.bfloat16, True)
from triton.testing import do_bench  # noqa: E402
for name, fn in tries.items():
    try:
        out = fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=50, rep=200)
        print(f"{name}: rel {rel(out, want):.2e}, {2 * M * N * Kd / ms / 1e9:.0f} TFLOP/s")
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
# the input gradient of a [2816, 2048] weight (the shared experts' gate/up): K = 2816 again
wg = torch.randn(Kd, N, device="cuda", dtype=torch.bfloat16) * 0.02
gq, g_s = K.weight_quant(wg)                      # [2816, 2048]
dyq, dy_s = K.act_quant(torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16))
want_dx = ref.fp8_gemm(dyq, dy_s, gq.t(), g_s.t(), torch.float32, True)
got_dx = K.fp8_matmul(dyq, dy_s, gq.t(), g_s.t(), out_dtype=torch.bfloat16, b_block=True)
print(f"fp8_matmul input gradient K=2816: rel {rel(got_dx, want_dx):.2e}; probes {G._PROBED}; failures {G.PROBE_FAILURES}")
ms = do_bench(lambda: G.fp8_gemm(aq, a_s, wq, w_s, torch.bfloat16, True), warmup=50, rep=200)
print(f"Triton fp8_gemm: {2 * M * N * Kd / ms / 1e9:.0f} TFLOP/s")
# the FP8 linear's weight-gradient call (1x128 x 1x128)
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
xq_t, xs_t = K.act_quant_t(a)
dyq_t, dys_t = K.act_quant_t(dy)
try:
    out = G.scaled_mm_blockwise(dyq_t, dys_t, xq_t, xs_t, torch.float32, False)
    print("wgrad 1x128 x 1x128 cuBLAS rel", rel(out, ref.fp8_gemm(dyq_t, dys_t, xq_t, xs_t, torch.float32, False)))
except Exception:
    traceback.print_exc()
