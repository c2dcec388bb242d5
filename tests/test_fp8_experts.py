"""The fused FP8 SwiGLU experts and the SwiGLU backward kernel.

* SwiGLU backward: the float32 reference against float64 autograd (rtol 1e-6: a few fp32
  roundings of O(1) values); the Triton kernel (interpreter, strided halves of one [M, 2I]
  tensor, as the experts pass them) against the reference: fp32 output 1e-6 relative (exp
  differs in the last bit), bf16 output one bf16 spacing.
* Fused experts with I a multiple of 128: every tile of every quantisation is the same as in
  the unfused composition (gate, up and down as three FP8 grouped linears, silu * up in
  fp32), so the forward and all four gradients must agree to fp32 summation order (1e-5).
* With I not a multiple of 128 the gate/up blocks mix; the layer must still stay within FP8
  tolerance of the unquantised float64 layer (and measurably off it: it ran in FP8).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.model.fp8_experts import fp8_swiglu_experts
from posttrain.model.fp8_training import fp8_grouped_linear
from posttrain.model import kernels as K
from posttrain.model.kernels import reference as R
from posttrain.model.kernels import swiglu as S


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_swiglu_backward_reference_matches_float64_autograd():
    g = torch.Generator().manual_seed(0)
    gate, up, dh = (torch.randn(37, 200, generator=g) * 3 for _ in range(3))
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    (F.silu(g64) * u64).backward(dh.double())
    got = S.swiglu_backward_reference(gate, up, dh)
    torch.testing.assert_close(got.double(), torch.cat([g64.grad, u64.grad], 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_triton_equals_reference(dtype):
    g = torch.Generator().manual_seed(1)
    M, inter = 37, 200  # neither a multiple of the kernel's tiles
    gu = (torch.randn(M, 2 * inter, generator=g) * 3).to(dtype)
    dh = torch.randn(M, inter, generator=g).to(dtype)
    gate, up = gu[:, :inter], gu[:, inter:]
    got = S.swiglu_backward_triton(gate, up, dh)
    want = S.swiglu_backward_reference(gate, up, dh)
    assert got.dtype == dtype and got.shape == (M, 2 * inter)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_triton_equals_reference_and_float64(dtype):
    g = torch.Generator().manual_seed(2)
    M, inter = 37, 200
    gu = (torch.randn(M, 2 * inter, generator=g) * 3).to(dtype)
    gate, up = gu[:, :inter], gu[:, inter:]  # strided halves, as a fused GEMM output gives them
    got = S.swiglu_forward_triton(gate, up)
    want = S.swiglu_forward_reference(gate, up)
    exact = F.silu(gate.double()) * up.double()
    assert got.dtype == dtype and got.shape == (M, inter)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(want.double(), exact, **tol)


def test_swiglu_autograd_fn_matches_float64_autograd():
    """The fused function (Triton forward and split backward, under the interpreter) against
    float64 autograd of silu(g) * u: output and both gradients within fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    gate, up, dh = (torch.randn(45, 130, generator=g) * 2 for _ in range(3))
    g32, u32 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    h = S._SwiGLUFn.apply(g32, u32)
    h.backward(dh)
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    h64 = F.silu(g64) * u64
    h64.backward(dh.double())
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g32.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u32.grad.double(), u64.grad, rtol=1e-5, atol=1e-5)
    assert g32.grad.is_contiguous() and u32.grad.is_contiguous()


def test_swiglu_backward_split_equals_side_by_side():
    g = torch.Generator().manual_seed(4)
    gate, up, dh = (torch.randn(20, 136, generator=g) for _ in range(3))
    both = S.swiglu_backward_triton(gate, up, dh)
    dg, du = S.swiglu_backward_triton(gate, up, dh, split=True)
    assert torch.equal(both[:, :136], dg) and torch.equal(both[:, 136:], du)


def _problem(inter: int, seed: int):
    """3 experts (the middle one empty) on 128-aligned rows, the padding rows zero."""
    g = torch.Generator().manual_seed(seed)
    E, D = 3, 256
    offsets = torch.tensor([128, 128, 384], dtype=torch.int32)
    x = torch.randn(384, D, generator=g)
    x[100:128] = 0  # padding of expert 0
    x[350:] = 0     # padding of expert 2
    ws = [torch.randn(E, inter, D, generator=g) * 0.06, torch.randn(E, inter, D, generator=g) * 0.06,
          torch.randn(E, D, inter, generator=g) * 0.06]
    dy = torch.randn(384, D, generator=g)
    return x, ws, dy, offsets


def _run(fn, x, ws, dy, offsets):
    x = x.clone().requires_grad_(True)
    ws = [w.clone().requires_grad_(True) for w in ws]
    y = fn(x, *ws, offsets)
    y.backward(dy)
    return [y.detach(), x.grad, *(w.grad for w in ws)]


def _fused(x, w_gate, w_up, w_down, offsets):
    """The experts' stacked [gate; up] parameter built from the two halves (cat's backward
    splits dW_gate_up into the halves' gradients)."""
    return fp8_swiglu_experts(x, torch.cat([w_gate, w_up], dim=1), w_down, offsets)


def _unfused(x, w_gate, w_up, w_down, offsets):
    gate = fp8_grouped_linear(x, w_gate, offsets)
    up = fp8_grouped_linear(x, w_up, offsets)
    return fp8_grouped_linear(F.silu(gate) * up, w_down, offsets)


def _float64(x, w_gate, w_up, w_down, offsets):
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        xe = x[start:end]
        out.append((F.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T)) @ w_down[e].T)
        start = end
    return torch.cat(out)


def test_fused_experts_equal_the_unfused_fp8_composition():
    x, ws, dy, offsets = _problem(inter=128, seed=2)
    fused = _run(_fused, x, ws, dy, offsets)
    unfused = _run(_unfused, x, ws, dy, offsets)
    for name, a, b in zip(["y", "dx", "dW_gate", "dW_up", "dW_down"], fused, unfused):
        assert rel(a, b) < 1e-5, name
    assert torch.equal(fused[2][1], torch.zeros_like(fused[2][1]))  # the empty expert


@pytest.mark.parametrize("inter", [128, 96])
def test_fused_experts_within_fp8_tolerance_of_float64(inter):
    x, ws, dy, offsets = _problem(inter=inter, seed=3)
    got = _run(_fused, x, ws, dy, offsets)
    want = _run(_float64, x.double(), [w.double() for w in ws], dy.double(), offsets)
    for name, a, b in zip(["y", "dx", "dW_gate", "dW_up", "dW_down"], got, want):
        if name == "dW_gate" or name == "dW_up":  # the empty expert's gradient is exactly 0
            a, b = torch.cat([a[:1], a[2:]]), torch.cat([b[:1], b[2:]])
        assert 5e-3 < rel(a, b) < 0.08, name


def test_frozen_weights_get_no_gradient_and_skip_their_gemms():
    x, ws, dy, offsets = _problem(inter=128, seed=4)
    x = x.clone().requires_grad_(True)
    y = _fused(x, *ws, offsets)  # weights do not require grad (e.g. LoRA's base)
    y.backward(dy)
    assert x.grad is not None and all(w.grad is None for w in ws)


def test_packed_swiglu_fn_matches_float64_and_returns_one_side_by_side_gradient():
    """[g | u] in, h out; the gradient is one [M, 2I] tensor [dg | du] (what lets the gate/up
    GEMM's input gradient run as one GEMM)."""
    g = torch.Generator().manual_seed(5)
    gu, dh = torch.randn(29, 2 * 72, generator=g) * 2, torch.randn(29, 72, generator=g)
    a = gu.clone().requires_grad_(True)
    h = S._PackedSwiGLUFn.apply(a, None)
    h.backward(dh)
    g64 = gu.double().requires_grad_(True)
    (F.silu(g64[:, :72]) * g64[:, 72:]).backward(dh.double())
    torch.testing.assert_close(h.double(), F.silu(gu.double()[:, :72]) * gu.double()[:, 72:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        S.swiglu_packed(torch.randn(3, 7))


def _weighted_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    M, inter = 37, 200  # neither a multiple of the kernel's tiles
    gu = torch.randn(M, 2 * inter, generator=g) * 3
    dh = torch.randn(M, inter, generator=g)
    row_w = torch.rand(M, generator=g) * 2.5
    row_w[5] = 0.0  # a padding row
    return gu, dh, row_w


def test_row_weighted_swiglu_reference_matches_float64_autograd():
    gu, dh, row_w = _weighted_problem(6)
    g64, w64 = gu.double().requires_grad_(True), row_w.double().requires_grad_(True)
    h64 = F.silu(g64[:, :200]) * g64[:, 200:] * w64[:, None]
    h64.backward(dh.double())
    h = S.swiglu_forward_reference(gu[:, :200], gu[:, 200:], row_w)
    dgu, drow_w = S.swiglu_backward_reference(gu[:, :200], gu[:, 200:], dh, row_w)
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgu.double(), g64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(drow_w.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert float(dgu[5].abs().max()) == 0.0  # a zero weight passes no gradient on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_weighted_swiglu_triton_equals_reference(dtype):
    gu, dh, row_w = _weighted_problem(7)
    gu, dh = gu.to(dtype), dh.to(dtype)
    gate, up = gu[:, :200], gu[:, 200:]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(S.swiglu_forward_triton(gate, up, row_w).float(),
                               S.swiglu_forward_reference(gate, up, row_w).float(), **tol)
    dgu, drow_w = S.swiglu_backward_triton(gate, up, dh, row_w=row_w)
    dgu_ref, drow_w_ref = S.swiglu_backward_reference(gate, up, dh, row_w)
    torch.testing.assert_close(dgu.float(), dgu_ref.float(), **tol)
    torch.testing.assert_close(drow_w, drow_w_ref, rtol=1e-5, atol=1e-4)
    dg, du, drow_w2 = S.swiglu_backward_triton(gate, up, dh, split=True, row_w=row_w)
    assert torch.equal(torch.cat([dg, du], 1), dgu) and torch.equal(drow_w2, drow_w)
    with pytest.raises(ValueError, match="row weights"):
        S.swiglu_forward_triton(gate, up, row_w.double())


def test_packed_swiglu_fn_with_row_weights_matches_float64():
    gu, dh, row_w = _weighted_problem(8)
    a, w = gu.clone().requires_grad_(True), row_w.clone().requires_grad_(True)
    S._PackedSwiGLUFn.apply(a, w).backward(dh)
    g64, w64 = gu.double().requires_grad_(True), row_w.double().requires_grad_(True)
    (F.silu(g64[:, :200]) * g64[:, 200:] * w64[:, None]).backward(dh.double())
    torch.testing.assert_close(a.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


def test_fused_experts_with_row_weights_within_fp8_tolerance_of_float64():
    """The gate weight applied to h before the FP8 down projection: output and every gradient
    (the row weights' included) within FP8 tolerance of float64, and measurably quantised."""
    x, ws, dy, offsets = _problem(inter=128, seed=9)
    row_w = torch.rand(384, generator=torch.Generator().manual_seed(10)) * 2.5
    row_w[100:128] = 0.0
    row_w[350:] = 0.0  # padding rows carry no weight

    def fused(x, w_gate, w_up, w_down, offsets, row_w):
        return fp8_swiglu_experts(x, torch.cat([w_gate, w_up], dim=1), w_down, offsets, row_w)

    def exact(x, w_gate, w_up, w_down, offsets, row_w):
        out, start = [], 0
        for e, end in enumerate(offsets.tolist()):
            xe = x[start:end]
            out.append((F.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T) * row_w[start:end, None]) @ w_down[e].T)
            start = end
        return torch.cat(out)

    def run(fn, x, ws, row_w, dy):
        x = x.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in ws]
        row_w = row_w.clone().requires_grad_(True)
        fn(x, *ws, offsets, row_w).backward(dy)
        return [x.grad, *(w.grad for w in ws), row_w.grad]

    got = run(fused, x, ws, row_w, dy)
    want = run(exact, x.double(), [w.double() for w in ws], row_w.double(), dy.double())
    y = fused(x, *ws, offsets, row_w)
    y64 = exact(x.double(), *[w.double() for w in ws], offsets, row_w.double())
    assert 5e-3 < rel(y, y64) < 0.08
    for name, a, b in zip(["dx", "dW_gate", "dW_up", "dW_down", "drow_w"], got, want):
        if name in ("dW_gate", "dW_up"):  # the empty expert's gradient is exactly 0
            a, b = torch.cat([a[:1], a[2:]]), torch.cat([b[:1], b[2:]])
        assert 5e-3 < rel(a, b) < 0.08, name


def test_row_weighted_swiglu_quantisations_within_one_fp8_step():
    """Both SwiGLU quantisations of the FP8 experts with per-row gate weights (Triton under the
    interpreter) against the reference of the weighted fp32 product: scales within 1e-6, codes
    never flipped in sign, at most one e4m3 step apart and rarely (exp may differ in the last bit)."""
    m, k = 150, 200
    g = torch.Generator().manual_seed(1480)
    gu = (torch.randn(m, 2 * k, generator=g) * 3).to(torch.bfloat16)
    gate, up = gu[:, :k], gu[:, k:]
    row_w = torch.rand(m, generator=g) * 2.5
    row_w[7] = 0.0  # a padding row
    ref_h = R.swiglu(gate, up, row_w)
    for got, want in ((K.swiglu_act_quant_triton(gate, up, row_w=row_w), R.act_quant(ref_h)),
                      (K.swiglu_act_quant_t_triton(gate, up, row_w=row_w), R.act_quant_t(ref_h))):
        (q, s), (qr, sr) = got, want
        assert q.shape == qr.shape and s.shape == sr.shape
        assert bool(((s - sr).abs() <= 1e-6 * sr).all())
        c, cr = q.view(torch.uint8).int(), qr.view(torch.uint8).int()
        assert bool((((c ^ cr) & 0x80) == 0).all())
        step = ((c & 0x7F) - (cr & 0x7F)).abs()
        assert int(step.max()) <= 1 and (step > 0).float().mean().item() <= 1e-3
    # the weights change the result: not a flag that does nothing
    unweighted = K.swiglu_act_quant_triton(gate, up)[0].view(torch.uint8)
    assert not torch.equal(K.swiglu_act_quant_triton(gate, up, row_w=row_w)[0].view(torch.uint8), unweighted)
    with pytest.raises(ValueError, match="row weights"):
        K.swiglu_act_quant_triton(gate, up, row_w=row_w[:-1])
