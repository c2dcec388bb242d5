"""Stage configs from YAML + overrides: numbers as people write them, unknown keys refused."""

import pytest

from posttrain.config import apply_overrides, load_yaml
from posttrain.model.args import ConfigError
from posttrain.paths import shipped_config
from posttrain.stages.grpo import grpo_config


def test_overrides_take_exponent_floats_and_reject_typos():
    data = apply_overrides(load_yaml(shipped_config("grpo", "tiny.yaml")),
                           ["train.lr=1e-3", "grpo.loss.beta=4e-2", "grpo.group_size=4"])
    cfg = grpo_config(data)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.grpo.loss.beta == 0.04 and cfg.grpo.group_size == 4
    with pytest.raises(ConfigError, match="expected a number"):
        grpo_config(apply_overrides(load_yaml(shipped_config("grpo", "tiny.yaml")), ["train.lr=fast"]))
    with pytest.raises(ConfigError, match="unknown key"):
        grpo_config(apply_overrides(load_yaml(shipped_config("grpo", "tiny.yaml")), ["grpo.grup_size=4"]))
    with pytest.raises(ConfigError, match="engine"):
        grpo_config(apply_overrides(load_yaml(shipped_config("grpo", "tiny.yaml")), ["engine=sglang"]))


def test_random_init_in_half_precision_keeps_float32_buffers():
    """A model built from a config in bf16 gets bf16 parameters, but the router bias, the load
    counts and RoPE's inverse frequencies stay float32 (rounded to bf16, RoPE's angles at
    position 4096 would be off by whole radians)."""
    import torch

    from posttrain.stages.sft import ModelSection, load_model

    model, _ = load_model(ModelSection(config="configs/model/tiny.json", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values()), {n: b.dtype for n, b in buffers.items()}
    assert any("inv_freq" in n for n in buffers) and any("e_score_correction_bias" in n for n in buffers)
    assert torch.get_default_dtype() == torch.float32
