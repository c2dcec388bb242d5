"""The posttrain pipeline: distillation, SFT, reward models and GRPO on one DeepSeek-V3 core."""

__version__ = "0.1.0"
