"""Every command's config class, in one place for the CLI (each lives beside its stage)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import setting
from posttrain.stages.convert import ConvertConfig
from posttrain.stages.distill_export import ExportConfig
from posttrain.stages.distill_filter import FilterStageConfig
from posttrain.stages.distill_generate import GenerateConfig
from posttrain.stages.grpo import GRPOConfig
from posttrain.stages.reward_score import ScoreConfig
from posttrain.stages.rm_eval import RMEvalConfig
from posttrain.stages.rm_train import RMConfig
from posttrain.stages.sft import SFTConfig


@dataclass
class ModelInfoConfig:
    config: str | None = None          # a config.json, or a checkpoint directory holding one
    kv_bytes: int = setting(2, ge=1)   # bytes per cached value (2 = bf16)
    json: bool = False


@dataclass
class ServeConfig:
    model: str | None = None           # a reward-model checkpoint directory (with score.weight)
    host: str = "127.0.0.1"
    port: int = setting(8010, ge=0, le=65535)   # 0: any free port
    batch_size: int = setting(16, ge=1)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0


__all__ = ["ConvertConfig", "DemoConfig", "ExportConfig", "FilterStageConfig", "GenerateConfig", "GRPOConfig",
           "ModelInfoConfig", "RMConfig", "RMEvalConfig", "ScoreConfig", "ServeConfig", "SFTConfig"]
