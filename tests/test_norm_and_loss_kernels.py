"""The fused RMSNorm and cross-entropy kernels (run under TRITON_INTERPRET=1 on CPU) against the
torch compositions the model runs on CPU, and those against float64.

The interpreter truncates float32 -> bf16 where the GPU rounds to nearest, so bf16 results are
held to a bf16 ulp or two rather than bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.model.kernels import cross_entropy as CE
from posttrain.model.kernels import mla_rope as MR
from posttrain.model.kernels import rmsnorm as RN


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _rms64(x, w, eps):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(37, 200), (6, 512), (300, 64)])
def test_rms_norm_float32_kernels_equal_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3 + 0.5
    w = torch.randn(shape[1], generator=g)
    dy = torch.randn(*shape, generator=g)
    y, rstd = RN.rms_norm_forward_triton(x, w, 1e-6)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = _rms64(x64, w64, 1e-6)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    dx, dw = RN.rms_norm_backward_triton(x, w, rstd, dy)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-4)
    # the torch composition the CPU path runs is the same function
    torch.testing.assert_close(RN.rms_norm_reference(x, w, 1e-6).double(), y64, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_autograd_matches_the_torch_composition():
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 33, 192, generator=g) * 2).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(192, generator=g)).to(torch.bfloat16)
    dy = torch.randn(4, 33, 192, generator=g).to(torch.bfloat16)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ya = RN._RMSNormFn.apply(xa.view(-1, 192), wa, 1e-6).view(4, 33, 192)
    ya.backward(dy)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yb = RN.rms_norm_reference(xb, wb, 1e-6)
    yb.backward(dy)
    assert ya.dtype == yb.dtype == torch.bfloat16
    assert xa.grad.dtype == torch.bfloat16 and wa.grad.dtype == torch.bfloat16
    assert rel(ya, yb) < 2 ** -7
    assert rel(xa.grad, xb.grad) < 2 ** -7
    assert rel(wa.grad, wb.grad) < 2 ** -7
    # both are close to float64 (the kernel rounds once, the composition several times)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    _rms64(x64, w64, 1e-6).backward(dy.double())
    assert rel(xa.grad, x64.grad) < 2 ** -7 and rel(wa.grad, w64.grad) < 2 ** -7


def test_rms_norm_float32_weight_on_bf16_input_promotes_like_the_reference():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(128, generator=g)
    y, _ = RN.rms_norm_forward_triton(x, w, 1e-6)
    want = RN.rms_norm_reference(x, w, 1e-6)
    assert y.dtype == want.dtype == torch.float32
    # the normalised x is rounded to bf16 before the weight, in both
    assert rel(y, want) < 2 ** -7


def test_rms_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="weight"):
        RN.rms_norm_forward_triton(torch.randn(3, 8), torch.randn(7), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [100, 4096, 9000])
def test_cross_entropy_kernels_equal_float64(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    n = 37
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    la = logits.clone().requires_grad_(True)
    loss = CE._CrossEntropyFn.apply(la, labels, -100)
    loss.backward(torch.tensor(1.7))
    l64 = logits.double().requires_grad_(True)
    want = F.cross_entropy(l64, labels, ignore_index=-100)
    want.backward(torch.tensor(1.7, dtype=torch.float64))
    assert loss.dtype == torch.float32 and la.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert rel(la.grad, l64.grad) < (1e-6 if dtype == torch.float32 else 2 ** -7)
    assert torch.all(la.grad[::4] == 0)  # ignored rows get no gradient
    # the torch path the CPU runs agrees as well
    torch.testing.assert_close(CE.cross_entropy(logits, labels).double(), want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_edge_cases_match_torch_semantics():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g)
    all_ignored = torch.full((4,), -100)
    assert torch.isnan(CE._CrossEntropyFn.apply(logits, all_ignored, -100))
    assert torch.isnan(CE.cross_entropy_reference(logits, all_ignored))
    # a label past the vocabulary is reported as a NaN loss, not read out of bounds
    assert torch.isnan(CE._CrossEntropyFn.apply(logits, torch.tensor([1, 2, 50, -100]), -100))
    with pytest.raises(ValueError, match="labels"):
        CE._CrossEntropyFn.apply(logits, torch.zeros(3, dtype=torch.long), -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,nope,rope,vdim", [(3, 16, 8, 12), (20, 32, 16, 32), (4, 8, 12, 8)])
def test_mla_qkv_kernels_equal_the_torch_composition(dtype, heads, nope, rope, vdim):
    """q/k/v assembly with the rotation: forward and all three input gradients, against the
    concatenations and rope.apply_rope under autograd. Strided inputs as the projections give
    them (k_pe a slice of the kv_a output); heads above the kernel's head block (20 > 16)."""
    g = torch.Generator().manual_seed(heads + nope)
    B, T = 2, 5
    q = torch.randn(B, T, heads * (nope + rope), generator=g).to(dtype).view(B, T, heads, nope + rope)
    kv = torch.randn(B, T, heads * (nope + vdim), generator=g).to(dtype).view(B, T, heads, nope + vdim)
    lat = torch.randn(B, T, 7 + rope, generator=g).to(dtype)
    k_pe = lat[..., 7:]
    angles = torch.rand(B, T, rope // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    grads = [torch.randn(B, T, heads, d, generator=g).to(dtype) for d in (nope + rope, nope + rope, vdim)]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, kv, k_pe)]
        outs = fn(*leaves, cos, sin, nope)
        torch.autograd.backward(outs, grads)
        return outs, [t.grad for t in leaves]

    got, got_grads = run(MR._MLAQKVFn.apply)
    want, want_grads = run(MR.mla_qkv_reference)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)
    # the rotation is orthogonal: q's rope part keeps its norm (a float64 property check)
    q_pe64 = q[..., nope:].double()
    assert abs(float(got[0][..., nope:].detach().double().norm() / q_pe64.norm()) - 1) < (1e-6 if dtype == torch.float32 else 1e-2)
