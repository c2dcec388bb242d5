"""Both FP8 layouts from one read (kernels/dual_quant.py), under TRITON_INTERPRET=1.

The fused kernels must give exactly what the single-layout kernels give (same tiles, same
arithmetic): act_quant + act_quant_t of x, and of the SwiGLU input gradient [dg | du] that
swiglu_backward would have written. Shapes are ragged (M and K not multiples of 128) and the
values span several binades, so every scale differs and the e4m3 rounding is exercised.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.model.kernels import dual_quant as DQ
from posttrain.model.kernels import reference as ref
from posttrain.model.kernels.quant import act_quant_t_triton, act_quant_triton
from posttrain.model.kernels.swiglu import swiglu_backward


def _assert_same(got, want):
    names = ("q", "s", "q_t", "s_t")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert a.stride() == b.stride(), f"{name}: strides {a.stride()} vs {b.stride()}"
        assert torch.equal(a.view(torch.uint8) if a.dtype == ref.FP8_DTYPE else a,
                           b.view(torch.uint8) if b.dtype == ref.FP8_DTYPE else b), name


def _spread(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * 2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_dual_equals_the_two_single_kernels(dtype):
    x = _spread((300, 200), 0, dtype)
    got = DQ.act_quant_dual_triton(x)
    _assert_same(got, (*act_quant_triton(x), *act_quant_t_triton(x)))
    # and the torch references (the CPU path of act_quant_dual)
    _assert_same(DQ.act_quant_dual(x), (*ref.act_quant(x), *ref.act_quant_t(x)))
    dq = got[0].float() * got[1].repeat_interleave(128, 1)[:, :200]
    assert 0 < float((dq - x.float()).norm() / x.float().norm()) < 0.05


def test_swiglu_backward_dual_quant_equals_gradient_then_quantise():
    M, inter = 200, 256
    gu = _spread((M, 2 * inter), 1, torch.bfloat16)
    gate, up = gu[:, :inter], gu[:, inter:]  # strided halves of one GEMM output
    dh = _spread((M, inter), 2, torch.bfloat16)
    got = DQ.swiglu_backward_dual_quant_triton(gate, up, dh)
    dgu = swiglu_backward(gate, up, dh)
    _assert_same(got, (*act_quant_triton(dgu), *act_quant_t_triton(dgu)))


def test_swiglu_backward_dual_quant_refuses_a_straddling_width_and_falls_back():
    gate, up, dh = (_spread((64, 200), s, torch.float32) for s in (3, 4, 5))
    with pytest.raises(ValueError, match="multiple of 128"):
        DQ.swiglu_backward_dual_quant_triton(gate, up, dh)
    dgu = swiglu_backward(gate, up, dh)
    _assert_same(DQ.swiglu_backward_dual_quant(gate, up, dh), (*ref.act_quant(dgu), *ref.act_quant_t(dgu)))
