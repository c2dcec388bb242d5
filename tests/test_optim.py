"""The loop's optimizer: AdamW as torch runs it fused, checked against AdamW written out in float64."""

import torch

from posttrain.train.config import TrainConfig
from posttrain.train.optim import AdamWBf16Moments, build_optimizer


def adamw_float64(p0, grads, lr, betas, eps, wd):
    """Decoupled weight decay, bias-corrected moments (Loshchilov & Hutter), in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


def test_adamw_steps_match_float64_and_leave_norms_undecayed():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5, bias=False), torch.nn.LayerNorm(5))
    with torch.no_grad():
        model[1].weight.normal_(1.0, 0.1, generator=g)
    start = [p.detach().clone() for p in model.parameters()]
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(4)]
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    for step in grads:
        for p, gr in zip(model.parameters(), step):
            p.grad = gr.clone()
        opt.step()
    for i, (p, p0) in enumerate(zip(model.parameters(), start)):
        wd = 0.1 if p.dim() >= 2 else 0.0  # the norm's weight is not decayed
        want = adamw_float64(p0, [s[i] for s in grads], cfg.lr, cfg.betas, cfg.eps, wd)
        assert torch.allclose(p.double(), want, rtol=0, atol=1e-6), (i, (p.double() - want).abs().max())
        assert not torch.equal(p, p0)


def test_sharded_and_bf16_moment_runs_keep_their_optimizers():
    model = torch.nn.Linear(4, 4)
    assert not build_optimizer(model, TrainConfig(fsdp=True)).defaults["fused"]
    assert isinstance(build_optimizer(model, TrainConfig(bf16_moments=True)), AdamWBf16Moments)
