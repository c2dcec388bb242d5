"""Text generation behind one interface (see base.py): vLLM, OpenAI-compatible HTTP, the
model core's KV-cache sampler, and the embedded scripted teacher."""

from __future__ import annotations

import os

from .base import Engine, Prompt, Sample, SamplingConfig, prompt_seed, sample_seed

ENGINES = ("torch", "vllm", "openai", "scripted")


def make_engine(kind: str, model: str | None = None, base_url: str | None = None, api_key_env: str | None = None,
                concurrency: int = 8, requests_per_s: float | None = None, dtype: str = "float32",
                max_model_len: int | None = None, latency_s: float = 0.0, tokenizer: str | None = None) -> Engine:
    """Build an engine by name, with a clear error for a missing argument."""
    if kind == "scripted":
        from posttrain.embedded import build_tokenizer
        from posttrain.embedded.teacher import ScriptedTeacher

        return ScriptedTeacher(build_tokenizer(), latency_s=latency_s)
    if kind in ("torch", "vllm") and not model:
        raise ValueError(f"--engine {kind} needs --model (an HF checkpoint directory)")
    if kind == "torch":
        import torch

        from .torch_engine import TorchEngine

        return TorchEngine.from_checkpoint(model, dtype=getattr(torch, dtype))
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, dtype=dtype, max_model_len=max_model_len)
    if kind == "openai":
        if not base_url or not model:
            raise ValueError("--engine openai needs --base-url and --model (the served model's name)")
        from .openai_engine import OpenAIEngine

        key = os.environ.get(api_key_env) if api_key_env else None
        tok = None
        if tokenizer:  # the served model's, for the completions' token ids where the server gives none
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer)
        return OpenAIEngine(base_url, model, api_key=key, concurrency=concurrency, requests_per_s=requests_per_s,
                            tokenizer=tok)
    raise ValueError(f"unknown engine {kind!r}; one of {', '.join(ENGINES)}")


__all__ = ["Engine", "Prompt", "Sample", "SamplingConfig", "make_engine", "prompt_seed", "sample_seed", "ENGINES"]
