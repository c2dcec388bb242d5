"""A packed row trains exactly like its samples run one by one (loss and gradients, fp32)."""

import torch

from helpers import randomize_, small_args
from posttrain.model import Transformer

IGNORE = -100


def _labels(x):
    return torch.cat([x[1:], torch.tensor([IGNORE])])


def test_packed_batch_equals_samples_one_by_one():
    torch.manual_seed(0)
    args = small_args(num_nextn_predict_layers=2, aux_loss_alpha=0.01)
    model = randomize_(Transformer(args), seed=5).train()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, args.vocab_size, (n,), generator=g) for n in (9, 5, 12)]
    # some prompt tokens are not trained on, as in SFT
    labels = [_labels(s) for s in samples]
    labels[0][:3] = IGNORE
    labels[2][:4] = IGNORE

    def mtp_targets(lab, seg=None):
        counts = []
        for k in range(1, args.num_nextn_predict_layers + 1):
            tgt = lab[k:].clone()
            if seg is not None:
                tgt[seg[k:] != seg[:-k]] = IGNORE
            counts.append(int((tgt != IGNORE).sum()))
        return counts

    # one by one
    params = [p for p in model.parameters()]
    ce_sum = mtp_sum = bal_sum = 0.0
    n_tok = sum(int((l != IGNORE).sum()) for l in labels)
    n_mtp = [sum(c) for c in zip(*(mtp_targets(l) for l in labels))]
    for s, l in zip(samples, labels):
        out = model.compute(s[None], labels=l[None])
        ce, mtp_parts, bal = out.loss * int((l != IGNORE).sum()), mtp_targets(l), out.balance_loss
        ce_sum = ce_sum + ce
        mtp_sum = mtp_sum + sum(x * c / m for x, c, m in zip(out.mtp_losses, mtp_parts, n_mtp))
        bal_sum = bal_sum + bal
    one_by_one = ce_sum / n_tok + 0.3 * mtp_sum + bal_sum / len(samples)
    grads_ref = torch.autograd.grad(one_by_one, params, allow_unused=True)

    # packed into one row, positions restarting, attention confined to each sample
    x = torch.cat(samples)[None]
    lab = torch.cat(labels)[None]
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])[None]
    pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
    out = model.compute(x, labels=lab, position_ids=pos, segment_ids=seg)
    assert mtp_targets(lab[0], seg[0]) == n_mtp
    packed = out.loss + 0.3 * sum(out.mtp_losses) + out.balance_loss
    grads = torch.autograd.grad(packed, params, allow_unused=True)

    assert torch.allclose(packed, one_by_one, rtol=1e-5, atol=0), (packed.item(), one_by_one.item())
    for p, a, b in zip(model.named_parameters(), grads, grads_ref):
        if a is None or b is None:
            assert a is None and b is None, p[0]
            continue
        scale = b.abs().max().clamp(min=1e-12)
        assert ((a - b).abs().max() / scale) <= 1e-5, p[0]


def test_routing_segments_worked_out_ahead_change_nothing():
    """The trainer works out packed rows' routing sequences on the CPU batch (no GPU sync) with
    the count rounded up to a power of two; the model then skips its own: loss, MTP losses,
    balance loss, load counts and gradients equal those of the model's own path."""
    from posttrain.model.moe import MoE, routing_segments_of

    args = small_args(num_nextn_predict_layers=2, aux_loss_alpha=0.01)
    model = randomize_(Transformer(args), seed=7).train()
    g = torch.Generator().manual_seed(3)
    B, T = 2, 24
    x = torch.randint(0, args.vocab_size, (B, T), generator=g)
    # row 0: three samples; row 1: two samples and padding (segment -1)
    seg = torch.tensor([[0] * 9 + [1] * 5 + [2] * 10, [0] * 7 + [1] * 12 + [-1] * 5])
    lab = torch.where(seg >= 0, x.roll(-1, 1), IGNORE)
    lab[:, -1] = IGNORE
    pos = torch.stack([torch.cat([torch.arange((r == s).sum()) for s in r.unique() if s >= 0] +
                                 [torch.zeros(int((r < 0).sum()), dtype=torch.long)]) for r in seg])
    rs = routing_segments_of(seg)
    assert rs.num_sequences == 8  # 5 sequences, rounded up: batches packing 5..8 share shapes

    params = list(model.parameters())
    results = []
    for extra in ({}, {"routing_segments": rs}):
        for m in model.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert.zero_()
        out = model.compute(x, labels=lab, position_ids=pos, segment_ids=seg, **extra)
        total = out.loss + 0.3 * sum(out.mtp_losses) + out.balance_loss
        grads = torch.autograd.grad(total, params, allow_unused=True)
        loads = [m.tokens_per_expert.clone() for m in model.modules() if isinstance(m, MoE)]
        results.append((out, grads, loads))
    (a, ga, la), (b, gb, lb) = results
    assert torch.allclose(a.loss, b.loss, rtol=1e-6, atol=0)
    for u, v in zip(a.mtp_losses, b.mtp_losses):
        assert torch.allclose(u, v, rtol=1e-6, atol=0)
    assert torch.allclose(a.balance_loss, b.balance_loss, rtol=1e-5, atol=0)
    assert all(torch.equal(u, v) for u, v in zip(la, lb)) and all(u.sum() > 0 for u in la)
    for (name, _), u, v in zip(model.named_parameters(), ga, gb):
        if u is None or v is None:
            assert u is None and v is None, name
            continue
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-7), name
