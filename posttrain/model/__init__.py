"""The shared DeepSeek-V3 model core. Every stage builds on this package; it imports no stage."""

from .args import ConfigError, ModelArgs, YarnScaling
from .transformer import KVCache, ModelOutput, Transformer
from .moe import update_router_bias
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "ConfigError", "ModelArgs", "YarnScaling", "Transformer", "ModelOutput", "KVCache",
    "update_router_bias", "load_checkpoint", "save_checkpoint",
]
