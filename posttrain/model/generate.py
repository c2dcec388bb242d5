"""KV-cache generation on the absorbed MLA path: the always-available engine.

The whole batch decodes at once. Prompts of different lengths are left-padded; positions
count real tokens only, so a padded prompt sees exactly the positions it would alone. When a
quarter of the rows still in the batch have finished, they leave it (their cache rows are
dropped), so short answers stop costing compute without a copy of the cache at every stop.

Sampling: greedy (temperature 0), or temperature with top-k and nucleus (top-p) truncation,
drawn for all rows at once by the Gumbel-max trick: token = argmax(z + g), z the processed
logits (logits / temperature, -inf outside top-k / top-p), g Gumbel noise that is a hash of
(the row's seed, the step, the token id) (`sampling_noise`). A row's samples therefore depend
on its seed alone, never on the batch or on which other rows have finished.

A sequence stops at any of its stop token ids (the stop token is kept, finish_reason "stop")
or after max_new_tokens ("length"). Log-probabilities, when asked, are of the sampled token
under the distribution it was drawn from: log_softmax(z), after temperature and truncation
(vLLM's "processed_logprobs"); greedy decoding reports the raw distribution's.

With `record_routing`, each Generation carries the experts every MoE layer chose for each
token the model processed: the prompt, then every generated token but the last (which is
never fed back), [prompt_len + n_generated - 1, MoE layers, K] (routing_replay.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .transformer import KVCache, Transformer

# a batch sheds its finished rows once they are this share of the rows still decoding
COMPACT_FRACTION = 0.25
_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None   # base seed of rows not given their own (row i: seed + i)
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
    routed_experts: np.ndarray | None = None   # [prompt_len + len(token_ids) - 1, MoE layers, K]


# ------------------------------------------------------------------ sampling noise
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 in int64, with no intermediate above 2^48."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xor-shift-multiply, two rounds)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: list[int], device) -> torch.Tensor:
    """A 32-bit key per row from its (up to 64-bit) seed."""
    lo = torch.tensor([int(v) & _M32 for v in seeds], dtype=torch.int64, device=device)
    hi = torch.tensor([(int(v) >> 32) & _M32 for v in seeds], dtype=torch.int64, device=device)
    return _mix32(lo ^ _mix32(hi ^ 0x5BD1E995))


@functools.lru_cache(maxsize=8)
def _token_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """The token ids' half of the noise key: the same at every step, so made once."""
    return _mix32(torch.arange(vocab, dtype=torch.int64, device=device) * 0x85EBCA6B & _M32)


def sampling_noise(keys_B: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] (float32), a pure function of (row key, step, token id)."""
    step_key = _mix32(keys_B ^ _mix32(torch.full_like(keys_B, (step * 0x9E3779B9 + 0x7F4A7C15) & _M32)))
    bits = _mix32(step_key[:, None] ^ _token_keys(vocab, keys_B.device)[None, :])
    u = (bits.double() + 0.5) * (1.0 / 4294967296.0)   # in (0, 1)
    return (-torch.log(-torch.log(u))).float()


def processed_logits(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits / temperature, -inf outside top-k and outside the top-p nucleus (float32)."""
    z = logits_BV.float() / params.temperature
    if params.top_k:
        kth = z.topk(min(params.top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, keys_B: torch.Tensor | None,
                step: int, with_logprob: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token [B], its log-prob [B], or None when not asked) for every row at once; see the
    module docstring."""
    if params.temperature == 0:
        token = logits_BV.argmax(-1)
        z = logits_BV.float()
    else:
        z = processed_logits(logits_BV, params)
        token = (z + sampling_noise(keys_B, step, z.shape[-1])).argmax(-1)
    return token, z.log_softmax(-1).gather(1, token[:, None]).squeeze(1) if with_logprob else None


# ------------------------------------------------------------------ decoding
def _keep_rows(cache: KVCache, keep: torch.Tensor) -> None:
    """Drop the cache rows of sequences that left the batch (in place)."""
    for layer in cache.layers:
        layer.kv_BSC = layer.kv_BSC.index_select(0, keep)
        layer.pe_BSR = layer.pe_BSR.index_select(0, keep)
    cache.key_padding_BS = cache.key_padding_BS.index_select(0, keep)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    pad_token_id: int | None = None,
    seeds: list[int] | None = None,
    record_routing: bool = False,
    tick=None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; one Generation per prompt (new tokens only).

    seeds: one per prompt (default params.seed + i, or 0 + i); a row's samples depend on its
    seed only (up to floating-point differences of batched matmuls). tick: called after every
    decode step (the CPU thread governor, train/cpu_threads.py)."""
    params = (params or SamplingParams()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    pad = pad_token_id if pad_token_id is not None else (model.args.pad_token_id or 0)
    B, P, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    if P + N > model.args.max_position_embeddings:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds "
                         f"max_position_embeddings ({model.args.max_position_embeddings})")
    if seeds is None:
        seeds = [(params.seed or 0) + i for i in range(B)]
    elif len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    real = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[b, P - len(p):] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    keys = row_keys(seeds, device)
    stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)

    recorder = None
    if record_routing:
        from .routing_replay import RoutingRecorder

        recorder = RoutingRecorder(model)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, P + N)
        logits = model.decode_step(ids, cache, positions, real)[:, -1]
        prompt_routing, fed_routing = None, None
        if recorder is not None:
            prompt_routing = recorder.take()[0].unflatten(0, (B, P)).cpu()
            small = model.args.n_routed_experts <= 256
            fed_routing = torch.zeros(B, max(N - 1, 0), *prompt_routing.shape[2:],
                                      dtype=torch.uint8 if small else torch.int16)
        out_tokens = torch.full((B, N), pad, dtype=torch.long, device=device)
        out_logp = torch.zeros(B, N, dtype=torch.float32, device=device)
        length = torch.full((B,), N, dtype=torch.long, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)        # the original row of each row still decoding
        done = torch.zeros(B, dtype=torch.bool, device=device)   # per row still in the batch
        next_pos = positions[:, -1] + 1
        for step in range(N):
            token, logp = sample_next(logits, params, keys, step, with_logprob=params.logprobs)
            live = rows[~done]
            out_tokens[live, step] = token[~done]
            if logp is not None:
                out_logp[live, step] = logp[~done]
            hit = torch.isin(token, stop) & ~done if len(stop) else torch.zeros_like(done)
            stopped[rows[hit]] = True
            length[rows[hit]] = step + 1
            done |= hit
            if step == N - 1:
                break
            n_done = int(done.sum())
            if n_done == len(rows):
                break
            if n_done and n_done >= COMPACT_FRACTION * len(rows):
                keep = (~done).nonzero().squeeze(1)
                _keep_rows(cache, keep)
                rows, keys, token, next_pos, done = rows[keep], keys[keep], token[keep], next_pos[keep], done[keep]
            logits = model.decode_step(token[:, None], cache, next_pos[:, None])[:, -1]
            next_pos = next_pos + 1
            if tick is not None:
                tick()
            if recorder is not None:
                fed_routing[rows.cpu(), step] = recorder.take()[0].to("cpu", fed_routing.dtype)
    finally:
        model.train(was_training)
        if recorder is not None:
            recorder.remove()
    tokens, logps, lengths = out_tokens.tolist(), out_logp.tolist(), length.tolist()
    finish = ["stop" if s else "length" for s in stopped.tolist()]
    result = []
    for b in range(B):
        n = lengths[b]
        routed = None
        if prompt_routing is not None:
            p = len(prompts[b])
            routed = np.concatenate([prompt_routing[b, P - p:].numpy().astype(fed_routing.numpy().dtype),
                                     fed_routing[b, :n - 1].numpy()])
        result.append(Generation(tokens[b][:n], finish[b], logps[b][:n] if params.logprobs else None,
                                 len(prompts[b]), routed))
    return result
