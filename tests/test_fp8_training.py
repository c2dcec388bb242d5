"""FP8 training layers (torch references on CPU) against float64 computations.

Each FP8 GEMM must equal, to fp32 rounding, the float64 product of its *quantised* operands
(which pins down which operand is quantised along which axis), and the whole layer must stay
within FP8 tolerance of the unquantised float64 layer.
"""

import pytest
import torch

from helpers import randomize_, small_args
from posttrain.model import Transformer
from posttrain.model import kernels as K
from posttrain.model.fp8_training import FP8Linear, enable_fp8_training, fp8_linear
from posttrain.model.fp8 import weight_dequant
from posttrain.model.moe import MoE


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _dq_rows(x):
    """float64 of the 1x128 quantisation of x's rows."""
    q, s = K.reference.act_quant(x)
    return q.double() * s.double().repeat_interleave(128, dim=1)[:, :q.shape[1]]


def _dq_weight(w):
    q, s = K.reference.weight_quant(w)
    return weight_dequant(q, s, torch.float64)


@pytest.mark.parametrize("M,D_in,D_out", [(37, 200, 144), (130, 256, 96)])
def test_fp8_linear_forward_and_both_gradients_equal_float64_of_quantised_operands(M, D_in, D_out):
    g = torch.Generator().manual_seed(M + D_in)
    x = torch.randn(M, D_in, generator=g).requires_grad_(True)
    w = (torch.randn(D_out, D_in, generator=g) * 0.05).requires_grad_(True)
    dy = torch.randn(M, D_out, generator=g)
    y = fp8_linear(x, w)
    y.backward(dy)

    y_ref = _dq_rows(x.detach()) @ _dq_weight(w.detach()).T
    dx_ref = _dq_rows(dy) @ _dq_weight(w.detach())                 # dy quantised along D_out
    dw_ref = _dq_rows(dy.T.contiguous()) @ _dq_rows(x.detach().T.contiguous()).T  # tokens as K
    for got, ref in ((y, y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        assert rel(got.detach(), ref) < 1e-5
    # and within FP8 tolerance of the unquantised float64 layer (3 mantissa bits: ~3-4%)
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()
    for got, ref in ((y, x64 @ w64.T), (x.grad, dy64 @ w64), (w.grad, dy64.T @ x64)):
        assert 5e-3 < rel(got.detach(), ref) < 0.06  # > 5e-3: it really ran in FP8


def test_fp8_moe_layer_gradients_match_float64_within_fp8_tolerance():
    args = small_args(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=3)
    ref = randomize_(MoE(args), seed=4).double().train()
    moe = randomize_(MoE(args), seed=4).float().train()
    enable_fp8_training(moe)
    assert moe.experts.fp8 and moe.fp8_experts
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 50, args.hidden_size, generator=g)
    up = torch.randn(3, 50, args.hidden_size, generator=g)
    x32, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    (moe(x32) * up).sum().backward()
    (ref(x64) * up.double()).sum().backward()
    # same routing (the router stays in high precision), so everything is comparable
    assert 5e-3 < rel(x32.grad, x64.grad) < 0.08
    for name in ("gate_up_proj", "down_proj"):
        got, want = getattr(moe.experts, name).grad, getattr(ref.experts, name).grad
        assert 5e-3 < rel(got, want) < 0.08, name
    assert rel(moe.gate.weight.grad, ref.gate.weight.grad) < 0.08


def test_enable_fp8_training_switches_projections_but_keeps_heads_and_names():
    args = small_args(hidden_size=64, vocab_size=96)
    model = randomize_(Transformer(args), seed=2)
    names_before = list(model.state_dict())
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    base = model.compute(ids, labels=ids).loss.item()
    counts = enable_fp8_training(model)
    assert counts["linear"] > 0 and counts["experts"] == sum(isinstance(m, MoE) for m in model.modules())  # MTP too
    assert counts["experts"] == args.num_hidden_layers - args.first_k_dense_replace + args.num_nextn_predict_layers
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.layers[0].self_attn.o_proj, FP8Linear)
    assert list(model.state_dict()) == names_before
    out = model.compute(ids, labels=ids)
    assert abs(out.loss.item() - base) / base < 0.05 and out.loss.item() != base
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
               and p.grad is not None)
    assert model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_train_config_fp8_switches_the_trained_model(tmp_path):
    from posttrain.train.config import TrainConfig
    from posttrain.train.loop import Trainer

    model = randomize_(Transformer(small_args(hidden_size=64, vocab_size=96)), seed=1)
    Trainer(model, TrainConfig(out_dir=str(tmp_path), fp8=True, report_to=[], progress=False),
            loss_fn=lambda *a, **k: None, collate=lambda rows: rows)
    assert isinstance(model.layers[0].mlp.gate_proj, FP8Linear) and model.layers[1].mlp.experts.fp8
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("fp8", [False, True])
def test_mlp_runs_gate_and_up_as_one_gemm_with_the_same_numbers(fp8, kernels):
    """MLP packs [W_gate; W_up] into one GEMM when it can: output and every gradient equal the
    two separate GEMMs (in FP8 the output and weight gradients bitwise, the 128-row weight blocks
    staying the same; the input gradient to summation order); a hooked
    or LoRA-wrapped projection is left to run on its own."""
    from posttrain.model.layers import MLP, packed_weight
    kernels(packed="always")  # the GPU's path, here on CPU tensors
    torch.manual_seed(0)
    mlp = MLP(256, 256)
    randomize_(mlp, 1)
    if fp8:
        for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            m.__class__ = FP8Linear
    x = torch.randn(3, 40, 256)
    dy = torch.randn(3, 40, 256)

    def run(pack: bool):
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if pack:
            assert packed_weight(mlp.gate_proj, mlp.up_proj) is not None
            y = mlp(xi)
        else:
            y = mlp.down_proj(S_swiglu(mlp.gate_proj(xi), mlp.up_proj(xi)))
        y.backward(dy)
        return [y.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()]

    from posttrain.model.kernels.swiglu import swiglu as S_swiglu
    packed, apart = run(True), run(False)
    for i, (a, b) in enumerate(zip(packed, apart)):
        if fp8 and i != 1:
            assert torch.equal(a, b)
        else:  # the input gradient sums over 2I in one GEMM instead of two GEMMs and an add
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    handle = mlp.up_proj.register_forward_hook(lambda *a: None)
    assert packed_weight(mlp.gate_proj, mlp.up_proj) is None
    handle.remove()
    if fp8:
        narrow = MLP(256, 192)
        for m in (narrow.gate_proj, narrow.up_proj):
            m.__class__ = FP8Linear
        assert packed_weight(narrow.gate_proj, narrow.up_proj) is None  # 192 rows: a weight block would mix gate and up


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_mla_packs_the_query_and_latent_projections_without_changing_the_function(q_lora_rank, kernels):
    """MLA runs q (or q_a) and kv_a as one GEMM on the same x; the output and every gradient
    equal the separate projections (a hook on kv_a makes it run them apart)."""
    from posttrain.model.attention import MLA
    from posttrain.model.rope import RotaryEmbedding
    kernels(packed="always")  # the GPU's path, here on CPU tensors
    args = small_args(q_lora_rank=q_lora_rank)
    mla = MLA(args)
    randomize_(mla, 2)
    x, dy = torch.randn(2, 9, args.hidden_size), torch.randn(2, 9, args.hidden_size)
    cos, sin = RotaryEmbedding(args)(torch.arange(9)[None].expand(2, 9))

    def run():
        mla.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        mla(xi, cos, sin).backward(dy)
        return [xi.grad] + [p.grad.clone() for p in mla.parameters()]

    from posttrain.model.layers import packed_weight
    q_in = mla.q_proj if q_lora_rank is None else mla.q_a_proj
    assert packed_weight(q_in, mla.kv_a_proj_with_mqa) is not None
    packed = run()
    handle = mla.kv_a_proj_with_mqa.register_forward_hook(lambda *a: None)
    assert packed_weight(q_in, mla.kv_a_proj_with_mqa) is None
    apart = run()
    handle.remove()
    for a, b in zip(packed, apart):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
