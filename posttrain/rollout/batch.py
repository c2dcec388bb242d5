"""Rollouts as the trainer's micro-batches.

Each row is prompt + completion, right-padded. Positions are those of the next-token
predictions ([B, T - 1]): `completion` marks the predictions of completion tokens (whose
log-probs are computed), `loss_mask` those the loss is taken over (a completion cut at the
length limit is left out with mask_truncated). `rollout_logp` holds the engine's log-probs
there (NaN where the engine gave none; `has_engine_logp` says whether any loss token has
one), `routed_experts` [B, T, L, K] the engine's experts
of each token it processed (-1 elsewhere).
"""

from __future__ import annotations

import numpy as np
import torch

from .record import Rollout


def collate_rollouts(rollouts: list[Rollout], pad: int, mask_truncated: bool, routing: tuple[int, int] | None) -> dict:
    """routing: (MoE layers, K) to collate the engine's routed experts, or None."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    B = len(rollouts)
    ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    completion = torch.zeros((B, T - 1), dtype=torch.bool)
    engine_logp = torch.full((B, T - 1), float("nan"), dtype=torch.float32)
    routed = torch.full((B, T, *routing), -1, dtype=torch.int16) if routing else None
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, :p + c] = torch.tensor(list(r.prompt_ids) + list(r.completion_ids))
        attn[i, :p + c] = 1
        completion[i, p - 1:p + c - 1] = True
        if r.engine_logprobs is not None and c:
            engine_logp[i, p - 1:p + c - 1] = torch.tensor(r.engine_logprobs, dtype=torch.float32)
        if routed is not None:
            got = np.asarray(r.routed_experts)
            if got.shape != (p + c - 1, *routing):
                raise ValueError(f"rollout {r.prompt_id}: routed experts of shape {got.shape}, expected "
                                 f"{(p + c - 1, *routing)} (prompt + completion - 1 tokens, MoE layers, K)")
            routed[i, :p + c - 1] = torch.from_numpy(got.astype(np.int16))
    loss_mask = completion.clone()
    for i, r in enumerate(rollouts):
        if mask_truncated and r.finish_reason == "length":
            loss_mask[i] = False
    batch = {"input_ids": ids, "attention_mask": attn, "completion": completion, "loss_mask": loss_mask.float(),
             "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
             "rollout_logp": engine_logp, "sequences": B,
             # decided here, on the CPU, so the training forward does not wait on the device for it
             "has_engine_logp": bool((~torch.isnan(engine_logp) & loss_mask).any())}
    if routed is not None:
        batch["routed_experts"] = routed
    return batch


def empty_batch(pad: int, routing: tuple[int, int] | None) -> dict:
    """A micro-batch that contributes nothing (no sequence, no loss token): a process with fewer
    micro-batches than another runs these, so all run the same forwards and backwards (the
    collectives of DDP, FSDP and the expert all-to-all need that)."""
    b = collate_rollouts([Rollout("", "", [pad], [pad], "", "stop")], pad, False, None)
    b["completion"].zero_()
    b["loss_mask"].zero_()
    b["sequences"] = 0
    b["has_engine_logp"] = False
    if routing:
        b["routed_experts"] = torch.full((1, 2, *routing), -1, dtype=torch.int16)
    return b
