"""MTP losses and gradients; the scalar head; packed-sample isolation."""

import pytest
import torch
import torch.nn.functional as F

from helpers import randomize_, small_args
from posttrain.model import Transformer, load_checkpoint, save_checkpoint


def test_mtp_losses_per_depth_are_finite_and_reach_shared_embedding_and_head():
    args = small_args(num_nextn_predict_layers=2)
    model = randomize_(Transformer(args), seed=31).train()
    ids = torch.randint(0, args.vocab_size, (2, 20))
    out = model.compute(ids[:, :-1], labels=ids[:, 1:])
    assert len(out.mtp_losses) == 2 and all(torch.isfinite(l) for l in out.mtp_losses)
    assert out.mtp_losses[0].item() != out.mtp_losses[1].item()
    model.zero_grad()
    sum(out.mtp_losses).backward()
    for name in ("embed_tokens.weight", "lm_head.weight", "mtp.0.eh_proj.weight", "mtp.1.eh_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the second depth builds on the first: its loss reaches depth 0's block
    model.zero_grad()
    out = model.compute(ids[:, :-1], labels=ids[:, 1:])
    out.mtp_losses[1].backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.mtp[1].shared_head.norm.weight.grad.abs().sum() > 0


def test_mtp_depth_k_targets_the_token_k_further_ahead():
    """Recompute depth-1's loss by hand from the module's parts."""
    args = small_args(num_nextn_predict_layers=1)
    model = randomize_(Transformer(args), seed=32).eval()
    ids = torch.randint(0, args.vocab_size, (2, 16))
    inp, labels = ids[:, :-1], ids[:, 1:]
    out = model.compute(inp, labels=labels)
    T = inp.shape[1]
    h = model.trunk(inp)[:, : T - 1]
    emb = model.embed_tokens(inp[:, 1:])
    cos, sin = model.rotary(torch.arange(T - 1)[None].expand(2, T - 1))
    m = model.mtp[0]
    x = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(h)], -1))
    logits = model.lm_head(m.shared_head.norm(super(type(m), m).forward(x, cos, sin)))  # Block.forward
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())
    assert torch.allclose(out.mtp_losses[0], ref, atol=1e-5)


def test_mtp_weights_roundtrip_under_release_names(tmp_path):
    args = small_args(num_nextn_predict_layers=1)
    model = randomize_(Transformer(args), seed=33)
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = args.num_hidden_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.{L}.{k}" in keys, k
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_checkpoint_without_mtp_weights_loads_with_a_warning(tmp_path):
    args = small_args(num_nextn_predict_layers=0)
    save_checkpoint(randomize_(Transformer(args), seed=34), args, tmp_path, dtype=torch.float32)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # as transformers writes for checkpoints without MTP weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="MTP depth"):
        model, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    assert len(model.mtp) == 1 and torch.isfinite(model.mtp[0].eh_proj.weight).all()


def test_scalar_head_scores_last_real_token_and_roundtrips(tmp_path):
    args = small_args()
    model = randomize_(Transformer(args, scalar_head=True), seed=35).eval()
    ids = torch.randint(3, args.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    scores = model.score_sequences(ids, mask)
    alone = model.score_tokens(ids[1:, :6])[0, -1]
    assert torch.allclose(scores[1], alone, atol=1e-5)
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    assert loaded.score is not None
    assert torch.allclose(loaded.eval().score_sequences(ids, mask), scores, atol=1e-6)
    with pytest.raises(RuntimeError, match="scalar head"):
        Transformer(args).score_tokens(ids)


def test_packed_segments_are_isolated():
    """Two samples packed in one row with restarting positions give the same logits as alone."""
    args = small_args()
    model = randomize_(Transformer(args), seed=36).eval()
    a = torch.randint(0, args.vocab_size, (1, 7))
    b = torch.randint(0, args.vocab_size, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        got = model(packed, position_ids=pos, segment_ids=seg)
        assert torch.allclose(got[:, :7], model(a), atol=1e-5)
        assert torch.allclose(got[:, 7:], model(b), atol=1e-5)
