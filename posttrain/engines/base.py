"""One interface for every text generator: vLLM offline, OpenAI-compatible HTTP, the model
core's own KV-cache sampler, and the embedded scripted teacher.

    engine.generate(prompts, sampling, seeds=None) -> list[list[Sample]]

A prompt is a string (used as is) or a list of chat messages (rendered with the model's
chat template, generation prompt added). Each prompt gets `sampling.n` samples. `seeds`
gives one seed per prompt; sample j of a prompt uses `sample_seed(seed, j)`, so a rerun of
the same prompt reproduces its samples whatever else is in the batch. The same
SamplingConfig drives all engines.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from posttrain.config import setting

Prompt = Union[str, list[dict[str, Any]]]


@dataclass
class SamplingConfig:
    n: int = setting(1, ge=1)
    max_tokens: int = setting(1024, ge=1)
    temperature: float = setting(0.6, ge=0)   # R1's recommended sampling
    top_p: float = setting(0.95, gt=0, le=1)
    top_k: int = setting(0, ge=0)             # 0 = off
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0
    logprobs: bool = False
    routed_experts: bool = False              # each token's experts per MoE layer (engines that can)

    def validate(self) -> "SamplingConfig":
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str                    # "stop" (eos, stop token or stop string) | "length"
    # of each generated token under the distribution it was sampled from (after temperature
    # and top-k / top-p), when asked; every engine defines them so
    logprobs: list[float] | None = None
    # when asked: the experts each MoE layer routed every processed token to, prompt tokens
    # then generated ones but the last, [len(prompt) + len(token_ids) - 1, MoE layers, K]
    routed_experts: Any = None


def sample_seed(prompt_seed: int, index: int) -> int:
    """A stable 63-bit seed for sample `index` of a prompt."""
    digest = hashlib.sha256(f"{prompt_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_seeds(sampling: SamplingConfig, n_prompts: int, seeds: list[int] | None) -> list[int]:
    """One seed per prompt: the caller's, or consecutive ones from sampling.seed."""
    if seeds is None:
        return [sampling.seed + i for i in range(n_prompts)]
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    return list(seeds)


def sample_rows(prompts: list[Prompt], sampling: SamplingConfig, seeds: list[int] | None,
                prompt_ids) -> list[tuple[int, list[int], int]]:
    """(prompt index, prompt token ids, sample seed) for every one of the n samples of each prompt."""
    seeds = resolve_seeds(sampling, len(prompts), seeds)
    rows = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(p)
        rows += [(i, ids, sample_seed(seeds[i], j)) for j in range(sampling.n)]
    return rows


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded, as vLLM does) and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class EngineError(RuntimeError):
    """A prompt the engine could not serve (e.g. a request rejected by the server)."""


def refuse_routed_experts(engine_name: str, sampling: SamplingConfig) -> None:
    """For engines that cannot report each token's experts."""
    if sampling.routed_experts:
        raise EngineError(f"the {engine_name} engine does not return routed experts (routing replay needs the "
                          "torch or the colocated vllm engine)")


class Engine(ABC):
    """A generator of samples. Subclasses set `name` (recorded as provenance)."""

    name: str = "engine"

    @abstractmethod
    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        ...

    def describe(self) -> dict:
        """Provenance: what produced the samples."""
        return {"engine": self.name}

    def close(self) -> None:
        pass


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template, strings encoded as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise TypeError("a prompt must be a string or a list of {'role', 'content'} messages")
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])
