"""Text generation behind one interface (see base.py): vLLM, OpenAI-compatible HTTP, the
model core's KV-cache sampler, and the embedded scripted teacher."""

from __future__ import annotations

import os
from dataclasses import dataclass

from posttrain.config import setting
from posttrain.model.args import ConfigError

from .base import Engine, Prompt, Sample, SamplingConfig, prompt_seed, sample_seed

ENGINES = ("torch", "vllm", "openai", "scripted")


@dataclass
class EngineConfig:
    """A text generator for distillation (`distill generate`'s `engine.*` keys)."""

    kind: str = setting("scripted", choices=ENGINES)
    model: str | None = None          # checkpoint directory (torch, vllm) or served model name (openai)
    base_url: str | None = None       # openai: the endpoint, e.g. http://127.0.0.1:8000
    api_key_env: str | None = None    # openai: the environment variable that holds the key
    tokenizer: str | None = None      # openai: the served model's tokenizer, for token ids
    concurrency: int = setting(8, ge=1)
    rps: float | None = setting(None, gt=0)        # openai: request rate limit
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))
    max_model_len: int | None = setting(None, ge=1)
    latency: float = setting(0.0, ge=0)            # scripted: a simulated delay per request (tests)


def make_engine(cfg: EngineConfig) -> Engine:
    """Build an engine, with a clear error naming the key that is missing."""
    kind, model = cfg.kind, cfg.model
    if kind == "scripted":
        from posttrain.embedded import build_tokenizer
        from posttrain.embedded.teacher import ScriptedTeacher

        return ScriptedTeacher(build_tokenizer(), latency_s=cfg.latency)
    if kind in ("torch", "vllm") and not model:
        raise ConfigError(f"engine.model is required for engine.kind={kind} (an HF checkpoint directory)")
    if kind == "torch":
        import torch

        from .torch_engine import TorchEngine

        return TorchEngine.from_checkpoint(model, dtype=getattr(torch, cfg.dtype))
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, dtype=cfg.dtype, max_model_len=cfg.max_model_len)
    if kind == "openai":
        if not cfg.base_url or not model:
            raise ConfigError("engine.base_url and engine.model (the served model's name) are required for "
                              "engine.kind=openai")
        from .openai_engine import OpenAIEngine

        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        tok = None
        if cfg.tokenizer:  # the served model's, for the completions' token ids where the server gives none
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
        return OpenAIEngine(cfg.base_url, model, api_key=key, concurrency=cfg.concurrency, requests_per_s=cfg.rps,
                            tokenizer=tok)
    raise ConfigError(f"engine.kind={kind!r}: one of {', '.join(ENGINES)}")


__all__ = ["Engine", "EngineConfig", "Prompt", "Sample", "SamplingConfig", "make_engine", "prompt_seed", "sample_seed", "ENGINES"]
