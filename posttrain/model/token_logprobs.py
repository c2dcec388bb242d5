"""Log-probabilities (and entropies) of chosen tokens from hidden states, in vocabulary-sized
chunks of tokens, never a float32 copy of all the logits.

For hidden rows h [N, D] and targets y [N], with logits z = head(h) / temperature:
    logp_n    = z_n[y_n] - logsumexp(z_n)
    entropy_n = logsumexp(z_n) - sum_v softmax(z_n)_v z_nv          (no gradient: for logging)

Rows are taken in chunks of about `chunk_elements / V`; each chunk's float32 logits live only
while that chunk is computed. With gradients, each chunk is recomputed in backward
(activation checkpointing) instead of keeping its logits: at a 163,840-word vocabulary, 128
sequences of 1,024 tokens would otherwise hold 86 GB of float32 logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 25   # float32 logits per chunk: 128 MiB


def _chunk(head: Callable, h: torch.Tensor, y: torch.Tensor, temperature: float, with_entropy: bool):
    z = head(h).float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, y[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def chosen_token_logprobs(head: Callable, h_ND: torch.Tensor, y_N: torch.Tensor, vocab_size: int,
                          temperature: float = 1.0, with_entropy: bool = False,
                          chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [N] float32, entropy [N] float32 or None) of y under softmax(head(h) / temperature)."""
    rows = max(1, chunk_elements // vocab_size)
    grad = torch.is_grad_enabled() and h_ND.requires_grad
    logps, entropies = [], []
    # no rows still runs one (empty) chunk: the result stays connected to the head and the
    # trunk, so a micro-batch without completion tokens takes part in backward like any other
    for s in range(0, max(h_ND.shape[0], 1), rows):
        h, y = h_ND[s:s + rows], y_N[s:s + rows]
        if grad:
            logp, entropy = checkpoint(_chunk, head, h, y, temperature, with_entropy, use_reentrant=False)
        else:
            logp, entropy = _chunk(head, h, y, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)
