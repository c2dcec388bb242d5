"""The fused router kernels (kernels/route.py, under TRITON_INTERPRET=1) against the torch route,
the stable-sort slot layout and autograd; and the MoE layer with them against the torch path."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_, small_args
from posttrain.model import moe as moe_mod
from posttrain.model.kernels import route as RK
from posttrain.model.moe import MoE, _FusedRoute, route, segment_sums, sequence_balance_loss

CASES = [  # (N, E, n_group, topk_group, K, norm)
    (37, 64, 1, 1, 6, True),
    (50, 32, 4, 2, 4, False),
    (19, 16, 8, 3, 3, True),
    (9, 12, 1, 1, 5, True),  # E and K not powers of two
]


def _inputs(N, E, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g) * 2
    bias = (torch.rand(E, generator=g) - 0.5) * 0.2
    bias[E // 3] = -50.0  # never chosen: an expert with zero tokens
    return logits, bias


@pytest.mark.parametrize("N,E,G,TG,K,norm", CASES)
def test_fused_route_equals_torch_route_and_counts_blocks(N, E, G, TG, K, norm):
    logits, bias = _inputs(N, E, seed=N + E)
    valid = torch.rand(N, generator=torch.Generator().manual_seed(1)) > 0.3
    w, idx, scores, hist, vhist = RK.route_forward(logits, bias, G, TG, K, norm, 2.5, valid)
    # sigmoid to float32 rounding
    torch.testing.assert_close(scores, logits.sigmoid(), rtol=3e-7, atol=0)
    # selection and weights: the torch route on the same affinities
    ref_w, ref_idx = route(scores, bias, G, TG, K, norm, 2.5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)
    assert (idx != E // 3).all()
    # per-block slot counts
    bn = RK.slot_block_tokens(E, K, interpret=True)  # conftest runs the kernels interpreted
    assert RK.block_tokens(E, interpret=True) < N  # several route blocks, count rows, scan chunks
    assert hist.shape == (RK.cdiv(N, bn), E) and hist.dtype == torch.int32
    for b in range(hist.shape[0]):
        part = idx[b * bn:(b + 1) * bn]
        assert torch.equal(hist[b], torch.bincount(part.flatten(), minlength=E).int())
        keep = valid[b * bn:(b + 1) * bn]
        assert torch.equal(vhist[b], torch.bincount(part[keep].flatten(), minlength=E).int())


def test_fused_route_weights_match_float64():
    N, E, K = 40, 32, 6
    logits, bias = _inputs(N, E, seed=5)
    w, idx, *_ = RK.route_forward(logits, bias, 4, 2, K, True, 2.5)
    s64 = logits.double().sigmoid()
    want = s64.gather(1, idx)
    want = want / want.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("N,E,G,TG,K,norm", CASES)
def test_slot_layout_equals_a_stable_sort_by_expert(N, E, G, TG, K, norm, multiple):
    logits, bias = _inputs(N, E, seed=3 * N + E)
    _, idx, _, hist, _ = RK.route_forward(logits, bias, G, TG, K, norm, 1.0)
    got = RK.slot_layout(idx, hist, multiple)
    ref = RK.slot_layout_reference(idx, E, multiple)
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.counts, ref.counts)
    assert torch.equal(got.offsets, ref.offsets) and got.num_rows == ref.num_rows
    # the reference itself: rows distinct, each expert's slots inside its range in (token, k) order
    rows, flat = ref.rows.flatten(), idx.flatten()
    assert rows.unique().numel() == rows.numel() and int(rows.max()) < ref.num_rows
    starts = (ref.offsets - ((ref.counts + multiple - 1) // multiple * multiple)).tolist()
    for e in range(E):
        mine = rows[flat == e]
        assert torch.equal(mine, torch.arange(starts[e], starts[e] + mine.numel()))
        if multiple > 1:
            assert starts[e] % multiple == 0


@pytest.mark.parametrize("N", [1, 2, 3])
def test_slot_layout_of_one_or_two_count_rows(N):
    """The offsets are written by one program: also right when there is just one."""
    logits, bias = _inputs(N, 16, seed=N)
    _, idx, _, hist, _ = RK.route_forward(logits, bias, 1, 1, 4, True, 1.0)
    got, ref = RK.slot_layout(idx, hist, 8), RK.slot_layout_reference(idx, 16, 8)
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.offsets, ref.offsets)


def test_slot_layout_of_no_tokens():
    idx = torch.empty(0, 3, dtype=torch.int64)
    hist = torch.empty(0, 8, dtype=torch.int32)
    got = RK.slot_layout(idx, hist, 8)
    assert got.rows.shape == (0, 3) and got.counts.tolist() == [0] * 8 and got.num_rows == 56


@pytest.mark.parametrize("with_scores_grad", [True, False])
@pytest.mark.parametrize("N,E,G,TG,K,norm", CASES)
def test_fused_route_backward_equals_autograd(N, E, G, TG, K, norm, with_scores_grad):
    logits, bias = _inputs(N, E, seed=7 * N + E)
    g = torch.Generator().manual_seed(11)
    gw, gs = torch.randn(N, K, generator=g), torch.randn(N, E, generator=g)

    def loss(w, scores):
        return (w * gw).sum() + ((scores * gs).sum() if with_scores_grad else 0.0)

    x = logits.clone().requires_grad_(True)
    w, idx, scores, _, _ = _FusedRoute.apply(x, bias, None, G, TG, K, norm, 2.5)
    (got,) = torch.autograd.grad(loss(w, scores), x)
    x64 = logits.double().requires_grad_(True)
    s64 = x64.sigmoid()
    w64 = s64.gather(1, idx)
    if norm:
        w64 = w64 / (w64.sum(-1, keepdim=True) + 1e-20)
    (want,) = torch.autograd.grad(loss(w64 * 2.5, s64), x64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    x32 = logits.clone().requires_grad_(True)
    ref_w, _ = route(x32.sigmoid(), bias, G, TG, K, norm, 2.5)
    (ref,) = torch.autograd.grad(loss(ref_w, x32.sigmoid()), x32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_route_rejects_bad_input():
    logits = torch.randn(4, 12)
    with pytest.raises(ValueError, match="float32"):
        RK.route_forward(logits.half(), torch.zeros(12), 1, 1, 2, True, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        RK.route_forward(logits, torch.zeros(12), 1, 1, 13, True, 1.0)
    with pytest.raises(ValueError, match="powers of two"):
        RK.route_forward(logits, torch.zeros(12), 3, 1, 2, True, 1.0)
    assert not RK.fused_route_supported(12, 3) and RK.fused_route_supported(12, 1)


@pytest.mark.parametrize("fp8", [False, True])
def test_moe_layer_with_fused_routing_equals_the_torch_path(fp8, monkeypatch):
    """The whole layer (training: load counts with padding, balance loss, backward) as it runs on
    the GPU (fused route, slot layout, shared experts added in the combine) against the torch
    path, on the same weights and packed input."""
    args = small_args(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    ref = randomize_(MoE(args), seed=8).train()
    fused = randomize_(MoE(args), seed=8).train()
    if fp8:
        for m in (ref, fused):
            m.fp8_experts = m.experts.fp8 = True
    x = torch.randn(2, 13, args.hidden_size, generator=torch.Generator().manual_seed(9))
    seg = torch.tensor([[0] * 6 + [1] * 7, [0] * 10 + [-1] * 3])
    dy = torch.randn_like(x)
    outs = []
    for m, on in ((ref, False), (fused, True)):
        monkeypatch.setattr(moe_mod, "use_fused_route", lambda logits, a, on=on: on)
        monkeypatch.setattr(moe_mod, "fuse_shared_add", lambda x, on=on: on)
        # FP8 quantises h: with the weights on it, the tiles' scales differ (tested apart)
        monkeypatch.setattr(moe_mod, "weights_before_down", lambda x, on=on and not fp8: on)
        xi = x.clone().requires_grad_(True)
        y = m(xi, seg)
        (y * dy).sum().backward(retain_graph=True)
        (gb,) = torch.autograd.grad(m.balance_loss, m.gate.weight)
        outs.append((y, xi.grad, m.gate.weight.grad, gb, m.tokens_per_expert.clone(),
                     m.experts.gate_up_proj.grad, m.experts.down_proj.grad))
    (y0, dx0, dw0, gb0, t0, gu0, dn0), (y1, dx1, dw1, gb1, t1, gu1, dn1) = outs
    assert torch.equal(t0, t1) and t1.sum() == 4 * 23  # padding tokens not counted
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gu1, gu0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dn1, dn0, rtol=1e-5, atol=1e-6)


def test_segment_sums_one_hot_and_index_add_agree_with_float64(monkeypatch):
    g = torch.Generator().manual_seed(12)
    v = torch.randn(30, 5, generator=g)
    seq = torch.tensor([0] * 7 + [2] * 9 + [-1] * 4 + [4] * 10)
    want = torch.zeros(6, 5, dtype=torch.float64)
    for n in range(30):
        if seq[n] >= 0:
            want[seq[n]] += v[n].double()
    torch.testing.assert_close(segment_sums(v, seq, 6).double(), want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(moe_mod, "_ONE_HOT_LIMIT", 0)
    torch.testing.assert_close(segment_sums(v, seq, 6).double(), want, rtol=1e-6, atol=1e-6)
    # and the loss through the index_add_ path equals the one-hot path
    scores = torch.rand(30, 8, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(30)])
    by_add = sequence_balance_loss(scores, idx, seq, 8, 6)
    monkeypatch.setattr(moe_mod, "_ONE_HOT_LIMIT", 1 << 24)
    torch.testing.assert_close(by_add, sequence_balance_loss(scores, idx, seq, 8, 6), rtol=1e-6, atol=0)
