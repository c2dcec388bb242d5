"""Checkpoint directories: sharding, atomic replacement, transformers-5 fused experts, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import randomize_, small_args
from posttrain.model import Transformer, load_checkpoint, save_checkpoint
from posttrain.model.checkpoint import CheckpointError


def _model(seed=41, **kw):
    args = small_args(**kw)
    return randomize_(Transformer(args), seed=seed), args


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model, args = _model()
    save_checkpoint(model, args, tmp_path, dtype=torch.float32, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_bf16_save_keeps_selection_bias_in_fp32(tmp_path):
    model, args = _model()
    save_checkpoint(model, args, tmp_path, dtype=torch.bfloat16)
    sd = load_file(tmp_path / "model.safetensors")
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    loaded, _ = load_checkpoint(tmp_path)  # default dtype bf16
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16


def test_save_replaces_an_existing_checkpoint_and_a_failed_save_leaves_it_intact(tmp_path):
    target = tmp_path / "ckpt"
    first, args = _model(seed=1)
    save_checkpoint(first, args, target, dtype=torch.float32)
    second, _ = _model(seed=2)
    save_checkpoint(second, args, target, dtype=torch.float32)
    loaded, _ = load_checkpoint(target, dtype=torch.float32)
    assert torch.equal(loaded.embed_tokens.weight, second.embed_tokens.weight)

    class Boom:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, args, target, dtype=torch.float32, tokenizer=Boom())
    loaded, _ = load_checkpoint(target, dtype=torch.float32)
    assert torch.equal(loaded.embed_tokens.weight, second.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_fused_expert_tensors_are_read(tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    model, args = _model()
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    sd = load_file(tmp_path / "model.safetensors")
    for layer in range(1, args.num_hidden_layers + 1):
        p = f"model.layers.{layer}.mlp.experts"
        E = args.n_routed_experts
        gate = torch.stack([sd.pop(f"{p}.{e}.gate_proj.weight") for e in range(E)])
        up = torch.stack([sd.pop(f"{p}.{e}.up_proj.weight") for e in range(E)])
        sd[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    save_file(sd, tmp_path / "model.safetensors")
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


@pytest.mark.parametrize("damage,message", [
    (lambda sd: sd.pop("model.layers.0.self_attn.o_proj.weight"), "missing tensors"),
    (lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight"), r"experts \[3\] missing"),
    (lambda sd: sd.__setitem__("model.layers.0.mystery.weight", torch.ones(2)), "no place for"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(3)), "expects"),
])
def test_damaged_checkpoints_raise_clear_errors(tmp_path, damage, message):
    model, args = _model()
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    sd = load_file(tmp_path / "model.safetensors")
    damage(sd)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_missing_shard_and_empty_directory_are_clear_errors(tmp_path):
    model, args = _model()
    save_checkpoint(model, args, tmp_path / "c", dtype=torch.float32, max_shard_bytes=100_000)
    next((tmp_path / "c").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "e").mkdir()
    args.save_json(tmp_path / "e" / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path / "e")


def test_tied_embeddings_roundtrip(tmp_path):
    model, args = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, args.vocab_size, (1, 8))
    assert torch.allclose(loaded.eval()(ids), model.eval()(ids), atol=1e-6)
