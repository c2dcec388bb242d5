"""The always-available engine: the model core's own KV-cache sampler (absorbed MLA path)."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.model import Transformer, load_checkpoint
from posttrain.model.generate import SamplingParams, generate

from .base import Engine, Prompt, Sample, SamplingConfig, cut_at_stop, render_prompt, sample_rows


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: Transformer, tokenizer, batch_size: int | None = None, model_name: str = "model"):
        """batch_size: rows decoded together (None: every row of a call at once)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.model_name = batch_size, model_name
        self.max_model_len = model.args.max_position_embeddings

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        batch_size: int | None = None) -> "TorchEngine":
        from transformers import AutoTokenizer

        model, _ = load_checkpoint(path, dtype=dtype, device=device)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), batch_size, model_name=str(path))

    def describe(self) -> dict:
        return {"engine": self.name, "model": self.model_name}

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return render_prompt(self.tokenizer, prompt)

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        sampling.validate()
        rows = sample_rows(prompts, sampling, seeds, self.prompt_ids)
        stop_ids = tuple(sorted(set(sampling.stop_token_ids) | {self.tokenizer.eos_token_id}))
        params = SamplingParams(max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=stop_ids,
                                logprobs=sampling.logprobs)
        out: list[list[Sample]] = [[] for _ in prompts]
        step = self.batch_size or len(rows)
        tick = None
        if self.model.embed_tokens.weight.device.type == "cpu":   # threads follow the CPU share we get
            from posttrain.train.cpu_threads import cpu_threads

            tick = cpu_threads().tick
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            gens = generate(self.model, [ids for _, ids, _ in batch], params,
                            pad_token_id=self.tokenizer.pad_token_id, seeds=[s for _, _, s in batch],
                            record_routing=sampling.routed_experts, tick=tick)
            for (i, _, _), g in zip(batch, gens):
                out[i].append(self._sample(g, sampling.stop))
        return out

    def _sample(self, g, stops: list[str]) -> Sample:
        token_ids, finish, logprobs, routed = g.token_ids, g.finish_reason, g.logprobs, g.routed_experts
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if stops:
            cut, found = cut_at_stop(text, stops)
            if found:  # keep the tokens up to the one that completed the stop string
                k = next(k for k in range(1, len(token_ids) + 1)
                         if cut_at_stop(self.tokenizer.decode(token_ids[:k], skip_special_tokens=True), stops)[1])
                token_ids, text, finish = token_ids[:k], cut, "stop"
                logprobs = logprobs[:k] if logprobs else logprobs
                routed = routed[:g.prompt_len + k - 1] if routed is not None else None
        return Sample(text, list(token_ids), finish, logprobs, routed)
