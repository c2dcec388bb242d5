"""Multi-token prediction (MTP): D sequential modules that each predict one token further ahead.

Module k (1-based) at position t combines the previous depth's hidden state h^{k-1}_t
(h^0 = the main model's final normed output) with the embedding of token t+k:

    h'_t = eh_proj([enorm(Emb(t_{t+k})); hnorm(h^{k-1}_t)])     (embedding first, as the
                                                                 released weights expect)
    h^k  = Block(h')                                            (one full transformer block)
    logits = lm_head(shared_head.norm(h^k))                     (head shared with the main model)

The embedding and the output head are the main model's; each module owns its norms,
projection and block. In the checkpoint module k-1 is layer `num_hidden_layers + k - 1`,
whose `embed_tokens` / `shared_head.head` entries are copies of the shared tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs
from .layers import RMSNorm
from .transformer import Block


class SharedHead(nn.Module):
    """Only the norm is owned; the head matrix is the main model's lm_head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPModule(Block):
    def __init__(self, args: ModelArgs, layer_idx: int):
        # The release's MTP block is a MoE block (layer 61 of V3); follow the model's rule.
        super().__init__(args, layer_idx, moe=args.n_routed_experts > 0 and layer_idx >= args.first_k_dense_replace)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def forward(self, h_prev_BTD, emb_BTD, cos, sin, mask=None, segment_ids=None):  # type: ignore[override]
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return super().forward(x, cos, sin, mask, segment_ids=segment_ids)
