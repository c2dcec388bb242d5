"""KV-cache generation on the absorbed MLA path: the always-available fallback engine.

Prompts of different lengths are left-padded into one batch; positions count real tokens
only, so a padded prompt sees exactly the positions it would alone. Sampling: greedy
(temperature 0), temperature, top-k and nucleus (top-p); a sequence stops at any of its stop
token ids (the stop token is kept in the output, finish_reason "stop") or after
max_new_tokens ("length"). Log-probabilities, when asked, are of the sampled token under the
model's raw distribution (log_softmax of the logits, before temperature and truncation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .transformer import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        return self


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None
    prompt_len: int = 0


def sample_next(logits_BV: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Pick one token per row from float32 logits (one generator per row draws that row's
    token, so a row's samples do not depend on what else is in the batch)."""
    if params.temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    pad_token_id: int | None = None,
    seeds: list[int] | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; returns one Generation per prompt (new tokens only).

    seeds: one per prompt; each row then samples from its own generator, so its output is the
    same whatever batch it is in (up to floating-point differences of batched matmuls).
    """
    params = (params or SamplingParams()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    pad = pad_token_id if pad_token_id is not None else (model.args.pad_token_id or 0)
    B = len(prompts)
    max_prompt = max(len(p) for p in prompts)
    total = max_prompt + params.max_new_tokens
    if total > model.args.max_position_embeddings:
        raise ValueError(f"prompt ({max_prompt}) + max_new_tokens ({params.max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.args.max_position_embeddings})")
    ids = torch.full((B, max_prompt), pad, dtype=torch.long, device=device)
    real = torch.zeros(B, max_prompt, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, max_prompt - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[b, max_prompt - len(p):] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    generator: torch.Generator | list[torch.Generator] | None = None
    if seeds is not None:
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts")
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    elif params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, total)
        logits = model.decode_step(ids, cache, positions, real)[:, -1].float()
        next_pos = positions[:, -1] + 1
        stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_logprobs: list[list[float]] = [[] for _ in range(B)]
        finished = [None] * B
        for _ in range(params.max_new_tokens):
            token = sample_next(logits, params, generator)
            if params.logprobs:
                lp = logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1).tolist()
            is_stop = torch.isin(token, stop).tolist() if len(stop) else [False] * B
            tok_list = token.tolist()
            for b in range(B):
                if finished[b] is not None:
                    continue
                out_tokens[b].append(tok_list[b])
                if params.logprobs:
                    out_logprobs[b].append(lp[b])
                if is_stop[b]:
                    finished[b] = "stop"
            if all(f is not None for f in finished):
                break
            logits = model.decode_step(token[:, None], cache, next_pos[:, None])[:, -1].float()
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return [
        Generation(out_tokens[b], finished[b] or "length", out_logprobs[b] if params.logprobs else None, len(prompts[b]))
        for b in range(B)
    ]
