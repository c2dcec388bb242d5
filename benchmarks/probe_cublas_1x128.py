import os, sys; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch, traceback
from posttrain.model import kernels as K
from posttrain.model.kernels import reference as ref, fp8_gemm as G
torch.manual_seed(0)
for (m, n, k) in [(64, 256, 512), (2816, 2048, 16384)]:
    a = torch.randn(m, k, device="cuda"); b = torch.randn(n, k, device="cuda")
    aq, as_ = K.act_quant(a); bq, bs = K.act_quant(b)
    want = ref.fp8_gemm(aq, as_, bq, bs, torch.float32, False)
    for od in (torch.float32, torch.bfloat16):
        try:
            got = G.scaled_mm_blockwise(aq, as_, bq, bs, od, False).float()
            print(m, n, k, od, "rel", float((got - want).norm() / want.norm()))
        except Exception as e:
            print(m, n, k, od, "ERR", type(e).__name__, str(e)[:400])
print("probe", G.cublas_blockwise_works(torch.device("cuda"), False), G.cublas_blockwise_works(torch.device("cuda"), True))
# the FP8 linear's weight-gradient call, as _FP8LinearFn.backward makes it
M, Kin, N = 16384, 2048, 2816
x = torch.randn(M, Kin, device="cuda", dtype=torch.bfloat16); dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
xq_t, xs_t = K.act_quant_t(x); dyq_t, dys_t = K.act_quant_t(dy)
print("shapes", dyq_t.shape, dys_t.shape, dys_t.stride(), xq_t.shape, xs_t.shape, xs_t.stride())
print("reason", G.scaled_mm_unsupported_reason(dyq_t, xq_t, False, torch.float32))
try:
    out = G.scaled_mm_blockwise(dyq_t, dys_t, xq_t, xs_t, torch.float32, False)
    want = ref.fp8_gemm(dyq_t, dys_t, xq_t, xs_t, torch.float32, False)
    print("wgrad cublas rel", float((out - want).norm() / want.norm()))
except Exception as e:
    traceback.print_exc()
calls = []
orig = G.fp8_gemm
G.fp8_gemm = lambda *a, **k: (calls.append("triton"), orig(*a, **k))[1]
K.fp8_matmul(dyq_t, dys_t, xq_t, xs_t, out_dtype=torch.float32, b_block=False)
print("fp8_matmul used triton:", bool(calls), G._PROBED)
