"""The router's bf16-in, float32-out GEMM (Triton under TRITON_INTERPRET=1) and the router logits'
autograd against the reference's F.linear(x.float(), W.float()) and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.model.kernels import router_gemm as RG
from posttrain.model.moe import _RouterLogits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("M,K,N", [(37, 70, 23), (16, 48, 64), (5, 33, 130)])
def test_mm_f32_kernel_equals_float64_on_bf16_operands(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(K, N, generator=g).to(torch.bfloat16)
    got = RG.mm_f32_triton(a, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    # bf16 products are exact in float32: only the float32 sums differ from float64
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, RG.mm_f32_reference(a, b), rtol=1e-5, atol=1e-5)


def test_mm_f32_kernel_reads_transposed_operands_and_splits_k():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(90, 12, generator=g).to(torch.bfloat16)   # [tokens, 2E]
    x = torch.randn(90, 40, generator=g).to(torch.bfloat16)   # [tokens, D]
    got = RG.mm_f32_triton(d.t(), x)                          # K = 90 tokens: split over programs
    torch.testing.assert_close(got.double(), d.double().t() @ x.double(), rtol=1e-5, atol=1e-5)
    w = torch.randn(12, 40, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(RG.mm_f32_triton(x, w.t()).double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-5)


def test_mm_f32_rejects_mismatched_operands():
    a = torch.randn(4, 8).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
        RG.mm_f32_triton(a, torch.randn(7, 3).to(torch.bfloat16))
    with pytest.raises(ValueError, match="two bf16 or two fp16"):
        RG.mm_f32_triton(a, torch.randn(8, 3))


def test_router_logits_autograd_matches_the_float32_reference_and_float64():
    """Logits, dx (bf16, rounded once) and dW from the hi/lo split of the float32 gradient."""
    g = torch.Generator().manual_seed(11)
    N, D, E = 96, 64, 16
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * 0.05).to(torch.bfloat16)
    dl = torch.randn(N, E, generator=g) * 1e-3  # float32, with bits below bf16's precision

    def run(fn, xx, ww, dd):
        xi, wi = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        out = fn(xi, wi)
        out.backward(dd)
        return out, xi.grad, wi.grad

    ours = run(_RouterLogits.apply, x, w, dl)
    ref = run(lambda a, b: F.linear(a.float(), b.float()), x, w, dl)
    exact = run(lambda a, b: a @ b.t(), x.double(), w.double(), dl.double())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for got, want, truth in zip(ours[1:], ref[1:], exact[1:]):
        # both round a float32-accurate result once to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert rel(got, truth) < 1.5 * rel(want, truth) + 1e-6
    # rounding the gradient to bf16 before the GEMMs (no lo part) would be measurably worse
    hi_only = (dl.to(torch.bfloat16).float() @ w.float()).to(torch.bfloat16)
    assert rel(ours[1], exact[1]) <= rel(hi_only, exact[1])
