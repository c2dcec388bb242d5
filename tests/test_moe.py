"""Router against a float64 reference, grouped GEMM against the loop, balance loss and bias update."""

import pytest
import torch

from helpers import randomize_, small_args
from posttrain.model import Transformer, update_router_bias
from posttrain.model.grouped_mm import grouped_mm
from posttrain.model.moe import MoE, expert_counts, route, sequence_balance_loss


def _reference_route(scores, bias, n_group, topk_group, top_k, norm, scale):
    """Plain-Python float64 re-statement of the V3 router, one token at a time."""
    N, E = scores.shape
    size = E // n_group
    weights, chosen = [], []
    for n in range(N):
        s = [float(v) for v in scores[n]]
        b = [s[e] + float(bias[e]) for e in range(E)]
        group_score = [sum(sorted(b[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        experts = sorted(allowed, key=lambda e: -b[e])[:top_k]
        w = [s[e] for e in experts]
        if norm:
            total = sum(w)
            w = [v / total for v in w]
        weights.append({e: v * scale for e, v in zip(experts, w)})
        chosen.append(set(experts))
    return weights, chosen


@pytest.mark.parametrize("n_group,topk_group,top_k,norm", [(8, 3, 6, True), (1, 1, 4, True), (4, 2, 5, False)])
def test_router_matches_float64_reference(n_group, topk_group, top_k, norm):
    g = torch.Generator().manual_seed(n_group * 10 + top_k)
    E = 32
    scores = torch.rand(64, E, generator=g, dtype=torch.float64)
    bias = (torch.rand(E, generator=g, dtype=torch.float64) - 0.5) * 0.3
    w, idx = route(scores, bias, n_group, topk_group, top_k, norm, 2.5)
    ref_w, ref_sets = _reference_route(scores, bias, n_group, topk_group, top_k, norm, 2.5)
    for n in range(64):
        assert set(idx[n].tolist()) == ref_sets[n]
        for k, e in enumerate(idx[n].tolist()):
            assert abs(w[n, k].item() - ref_w[n][e]) < 1e-12


def test_bias_changes_selection_but_not_gate_weights():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(200, 16, generator=g, dtype=torch.float64)
    no_bias = torch.zeros(16, dtype=torch.float64)
    bias = torch.zeros(16, dtype=torch.float64)
    bias[3] = 5.0  # expert 3 is chosen for every token once biased
    w0, i0 = route(scores, no_bias, 4, 2, 4, True, 1.0)
    w1, i1 = route(scores, bias, 4, 2, 4, True, 1.0)
    assert (i1 == 3).any(-1).all() and not (i0 == 3).any(-1).all()
    # gate weights are the *unbiased* affinities of the chosen experts, normalised
    expect = scores.gather(1, i1)
    expect = expect / expect.sum(-1, keepdim=True)
    assert torch.allclose(w1, expect, atol=1e-12)
    assert w1.max() < 1.0  # a bias of 5 would dominate if it leaked into the weights


@pytest.mark.parametrize("impl,n_out", [("loop", 16), ("torch", 16), ("torch", 10)])
def test_grouped_mm_equals_per_expert_matmul_with_empty_experts(impl, n_out, kernels):
    """Both implementations; n_out=10 breaks _grouped_mm's 16-byte stride rule and must fall back."""
    kernels(grouped_mm=impl)
    g = torch.Generator().manual_seed(2)
    counts = [5, 0, 9, 0, 0, 3]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 24, generator=g, requires_grad=True)
    w = torch.randn(6, 24, n_out, generator=g, requires_grad=True)
    y = grouped_mm(x, w, offs)
    ref = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    assert torch.allclose(y, ref, atol=1e-5)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * gy).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * gy).sum(), (x, w))
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
    assert gw[1].abs().sum() == 0  # an expert with no tokens gets no gradient


def test_moe_layer_equals_dense_per_token_computation():
    args = small_args()
    moe = randomize_(MoE(args), seed=3).eval()
    x = torch.randn(2, 11, args.hidden_size)
    y = moe(x)
    flat = x.reshape(-1, args.hidden_size)
    r = moe.gate(flat)
    w, idx = r.weights, r.idx
    ref = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            w_gate, w_up = moe.experts.gate_up_proj[e].chunk(2)  # [gate; up] rows per expert
            h = torch.nn.functional.silu(flat[n] @ w_gate.T) * (flat[n] @ w_up.T)
            ref[n] += w[n, k] * (h @ moe.experts.down_proj[e].T)
    ref = ref + moe.shared_experts(flat)
    assert torch.allclose(y.reshape(-1, args.hidden_size), ref, atol=1e-5)


def test_sequence_balance_loss_matches_float64_hand_computation():
    g = torch.Generator().manual_seed(4)
    B, T, E, K = 3, 7, 8, 2
    scores = torch.rand(B, T, E, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    seq = torch.arange(B).repeat_interleave(T)
    got = sequence_balance_loss(scores.float().reshape(B * T, E), idx.reshape(B * T, K), seq, E)
    total = 0.0
    for b in range(B):
        for e in range(E):
            f = E / (K * T) * sum(int(e in idx[b, t].tolist()) for t in range(T))
            p = sum(float(scores[b, t, e] / scores[b, t].sum()) for t in range(T)) / T
            total += f * p
    assert abs(got.item() - total / B) < 1e-5


def test_balance_loss_with_a_sequence_bound_and_padding_equals_the_exact_count():
    """A static bound on the number of sequences (what the model passes, so that no host sync
    is needed) and padding tokens (seq -1) change nothing: same value and gradient as the
    loss on the real tokens with the exact count."""
    g = torch.Generator().manual_seed(6)
    N, E, K = 40, 8, 3
    scores = torch.rand(N, E, generator=g, dtype=torch.float64).requires_grad_(True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    seq = torch.tensor([0] * 12 + [2] * 10 + [-1] * 6 + [3] * 12)  # sequence 1 absent
    keep = seq >= 0
    exact = sequence_balance_loss(scores[keep], idx[keep], torch.unique(seq[keep], return_inverse=True)[1], E)
    (ge,) = torch.autograd.grad(exact, scores)
    bounded = sequence_balance_loss(scores, idx, seq, E, num_sequences=9)
    (gb,) = torch.autograd.grad(bounded, scores)
    assert abs(exact.item() - bounded.item()) < 1e-12 and exact.item() > 0
    torch.testing.assert_close(gb, ge, rtol=0, atol=1e-12)
    assert gb[~keep].abs().max() == 0


def test_expert_counts_equal_bincount():
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 11, (50, 4), generator=g)
    w = torch.rand(50, generator=g) > 0.3
    assert torch.equal(expert_counts(idx, 13), torch.bincount(idx.flatten(), minlength=13))
    want = torch.bincount(idx[w].flatten(), minlength=13).float()
    assert torch.equal(expert_counts(idx, 13, w), want)


def test_bias_update_balances_skewed_routing():
    torch.manual_seed(5)
    args = small_args(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(args).train()
    with torch.no_grad():
        # a shared direction in every token that some experts like far more than others
        u = torch.randn(args.hidden_size)
        u /= u.norm()
        moe.gate.weight.copy_(torch.randn(16, args.hidden_size) * 0.05 + torch.linspace(2, -2, 16)[:, None] * u)

    def imbalance():
        moe.tokens_per_expert.zero_()
        with torch.no_grad():
            moe(torch.randn(8, 64, args.hidden_size) * 0.3 + u)
        load = moe.tokens_per_expert.clone()
        moe.tokens_per_expert.zero_()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(200):
        with torch.no_grad():
            moe(torch.randn(8, 64, args.hidden_size) * 0.3 + u)
        update_router_bias(moe, gamma=0.01)
    after = imbalance()
    assert before > 2.5, before
    assert after <= before / 2, (before, after)
    assert moe.gate.e_score_correction_bias.requires_grad is False


def test_frozen_bias_resets_counts_without_moving():
    args = small_args()
    model = Transformer(args).train()
    ids = torch.randint(0, args.vocab_size, (2, 11))
    model.compute(ids[:, :-1], labels=ids[:, 1:])  # main layers route 2 x 10 tokens, MTP depth 1 2 x 9
    K = args.num_experts_per_tok
    assert all(l.mlp.tokens_per_expert.sum() == 2 * 10 * K for l in model.layers if isinstance(l.mlp, MoE))
    assert model.mtp[0].mlp.tokens_per_expert.sum() == 2 * 9 * K
    stats = update_router_bias(model, gamma=0.0)
    assert len(stats) == len(model.moe_layers()) and all(v >= 1.0 for v in stats.values())
    assert all(m.gate.e_score_correction_bias.abs().sum() == 0 for m in model.moe_layers())
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())


def test_balance_loss_reaches_router_weights_only_through_affinities():
    args = small_args()
    model = randomize_(Transformer(args), seed=6).train()
    ids = torch.randint(0, args.vocab_size, (2, 12))
    out = model.compute(ids[:, :-1], labels=ids[:, 1:])
    assert out.balance_loss is not None and out.balance_loss > 0
    out.balance_loss.backward()
    router = model.layers[-1].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.layers[-1].mlp.experts.gate_up_proj.grad is None  # selection counts carry no gradient


def test_balance_loss_is_taken_so_no_module_keeps_the_last_graph():
    """A loss left on a module would hold its forward's autograd graph into the next step."""
    args = small_args()
    model = randomize_(Transformer(args), seed=7).train()
    ids = torch.randint(0, args.vocab_size, (2, 12))
    model.trunk(ids)
    trunk_moe = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    assert trunk_moe and all(m.balance_loss is not None for m in trunk_moe)
    taken = model.balance_loss()
    assert taken is not None and taken.grad_fn is not None
    assert all(m.balance_loss is None for m in model.moe_layers())
    assert model.balance_loss() is None  # nothing left to take until the next forward
    out = model.compute(ids[:, :-1], labels=ids[:, 1:])
    assert out.balance_loss is not None
    assert all(m.balance_loss is None for m in model.modules() if isinstance(m, MoE))


def test_moe_backward_is_bitwise_reproducible_with_several_threads():
    """Each token is routed to K experts; summing its K gradients must not depend on thread timing.

    A plain `x[token_of_row]` gather makes the backward a colliding scatter-add whose order
    varies with the CPU thread schedule: the same step then gives different gradients
    (and a demo whose figure changes from run to run).
    """
    from posttrain.model import ModelArgs
    from posttrain.paths import model_config

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        args = ModelArgs.from_json(model_config("tiny"))
        moe = randomize_(MoE(args), seed=5).train()
        x = torch.randn(4, 512, args.hidden_size, generator=torch.Generator().manual_seed(6))
        upstream = torch.randn(4, 512, args.hidden_size, generator=torch.Generator().manual_seed(7))
        grads = []
        for _ in range(6):
            xi = x.clone().requires_grad_(True)
            (moe(xi) * upstream).sum().backward()
            grads.append(xi.grad)
        assert grads[0].abs().sum() > 0
        for g in grads[1:]:
            assert torch.equal(g, grads[0])
    finally:
        torch.set_num_threads(threads)


def test_packed_gate_up_grouped_gemm_equals_the_two_separate_gemms(kernels):
    """The GPU path runs gate and up as one grouped GEMM over [E, 2I, D] and the packed SwiGLU;
    the CPU path runs two GEMMs on the halves. Same outputs and gradients (float32)."""
    from posttrain.model.moe import GroupedExperts
    g = torch.Generator().manual_seed(12)
    experts = GroupedExperts(4, 24, 20)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(30, 24, generator=g)
    offsets = torch.tensor([7, 7, 19, 30], dtype=torch.int32)  # expert 1 gets no rows
    dy = torch.randn(30, 24, generator=g)

    def run(packed):
        kernels(packed="always" if packed else "auto")
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, offsets)
        y.backward(dy)
        return y.detach(), xi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    apart, packed = run(False), run(True)
    for name, a, b in zip(["y", "dx", "dW_gate_up", "dW_down"], apart, packed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert packed[2][1].abs().max() == 0 and packed[2][0].abs().max() > 0  # the expert without rows
