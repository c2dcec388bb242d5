"""ModelArgs <-> config.json: the shipped configs, round trips, and clear errors for bad fields."""

import json
from pathlib import Path

import pytest

from helpers import hf_config, small_args
from posttrain.model import ConfigError, ModelArgs

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


@pytest.mark.parametrize("name", ["tiny", "16B", "236B", "671B"])
def test_shipped_configs_load_and_roundtrip(name):
    args = ModelArgs.from_json(CONFIGS / f"{name}.json")
    again = ModelArgs.from_hf_config(args.to_hf_config())
    assert again == args
    written = args.to_hf_config()
    assert written["topk_method"] == "noaux_tc" and written["scoring_func"] == "sigmoid"


def test_tiny_config_turns_every_feature_on():
    a = ModelArgs.from_json(CONFIGS / "tiny.json")
    assert a.q_lora_rank and a.n_group > 1 and a.rope_scaling is not None and a.num_nextn_predict_layers >= 1
    assert 0 < a.first_k_dense_replace < a.num_hidden_layers and a.n_shared_experts >= 1
    assert a.kv_lora_rank == 512 and a.qk_rope_head_dim == 64  # what vLLM's CPU MLA kernel accepts


def test_release_671B_values():
    a = ModelArgs.from_json(CONFIGS / "671B.json")
    assert (a.hidden_size, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (a.n_group, a.topk_group, a.q_lora_rank, a.kv_lora_rank) == (8, 4, 1536, 512)
    assert a.rope_scaling.factor == 40 and a.rope_scaling.original_max_position_embeddings == 4096


def test_transformers_5_config_format_is_read(tmp_path):
    """transformers 5 writes rope_parameters, head_dim, qk_head_dim, rope_interleave, dtype."""
    args = small_args()
    hf_config(args).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in cfg
    loaded = ModelArgs.from_json(tmp_path)
    assert loaded.rope_scaling == args.rope_scaling and loaded.rope_theta == args.rope_theta
    assert loaded.hidden_size == args.hidden_size


def _cfg(**changes):
    cfg = small_args().to_hf_config()
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_sizee=64), "unknown config field"),
    (dict(model_type="llama"), "model_type"),
    (dict(n_routed_experts=10), "not divisible by n_group"),
    (dict(topk_group=5), "topk_group=5 > n_group"),
    (dict(num_experts_per_tok=7), "num_experts_per_tok=7"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(q_lora_rank="big"), "q_lora_rank must be an integer"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob must be true/false"),
    (dict(scoring_func="softmax"), "sigmoid"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "betta": 1}), "unknown rope_scaling"),
    (dict(qk_rope_head_dim=7), "even"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(rope_interleave=False), "interleaved"),
    (dict(head_dim=12), "head_dim"),
    (dict(hidden_act="gelu"), "SiLU"),
])
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config(_cfg(**changes))


def test_null_q_lora_rank_is_accepted():
    assert ModelArgs.from_hf_config(_cfg(q_lora_rank=None)).q_lora_rank is None


def test_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_cfg(n_group=3)))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        ModelArgs.from_json(tmp_path)
    with pytest.raises(ConfigError, match="no config"):
        ModelArgs.from_json(tmp_path / "missing")
