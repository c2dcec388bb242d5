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
