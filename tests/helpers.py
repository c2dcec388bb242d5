"""Shared builders for the model tests: small random configs and randomised weights."""

from __future__ import annotations

import torch

from posttrain.model import ModelArgs, YarnScaling

SHARED_DATA = "../shared/data"


def small_args(**overrides) -> ModelArgs:
    """A config small enough for many CPU forwards, with every feature available."""
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=16, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707),
    )
    base.update(overrides)
    return ModelArgs(**base).validate()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Weights far from init (norm weights around 1, non-zero selection biases) so that every
    term of the forward matters and a wrong one shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * std)
        else:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.rand(b.shape, generator=g) * 0.2)
    return model


def hf_config(args: ModelArgs):
    """The transformers DeepseekV3Config for the same architecture."""
    from transformers import DeepseekV3Config

    cfg = args.to_hf_config("float32")
    for key in ("architectures", "model_type", "torch_dtype", "ep_size", "topk_method", "scoring_func",
                "seq_aux", "aux_loss_alpha", "moe_layer_freq"):
        cfg.pop(key)
    return DeepseekV3Config(**cfg)


def digit_share(prompts=None, completions=None, **columns):
    """A reward with TRL's signature that varies even for an untrained policy's text (for RL
    tests that need groups with unequal rewards); configs name it `helpers:digit_share`.
    Completions come as chat messages when the prompts are chats (TRL's convention)."""
    from reward.text import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
