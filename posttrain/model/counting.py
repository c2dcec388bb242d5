"""Parameter and KV-cache arithmetic from ModelArgs alone (no weights are built).

"Activated" parameters are the ones a token's forward pass multiplies with: every dense
weight, the shared experts and num_experts_per_tok routed experts per MoE layer, the router
and the LM head, but not the input embedding table (a lookup, not a matmul) and not the
E - k idle experts. With that definition the released DeepSeek-V3 config gives the report's
37B activated of 671B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .args import ModelArgs


@dataclass
class ParamCounts:
    total: int                 # main model (what the report calls 671B)
    active: int                # per token, main model
    mtp: int                   # MTP modules' own weights (embedding and head are shared)
    mtp_checkpoint: int        # MTP as stored: plus one embedding and head copy per depth
    active_mtp: int            # per token, MTP modules
    embedding: int
    lm_head: int

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_checkpoint

    def as_dict(self) -> dict:
        return {**asdict(self), "total_with_mtp": self.total_with_mtp}


def _attention(a: ModelArgs) -> int:
    D, H = a.hidden_size, a.num_attention_heads
    if a.q_lora_rank is None:
        q = D * H * a.qk_head_dim
    else:
        q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * a.qk_head_dim
    kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + H * a.v_head_dim * D


def _ffn(a: ModelArgs, moe: bool) -> tuple[int, int]:
    """(total, active) FFN parameters of one layer."""
    D = a.hidden_size
    if not moe:
        dense = 3 * D * a.intermediate_size
        return dense, dense
    expert = 3 * D * a.moe_intermediate_size
    shared = a.n_shared_experts * expert
    router = a.n_routed_experts * D
    return (router + shared + a.n_routed_experts * expert,
            router + shared + a.num_experts_per_tok * expert)


def _block(a: ModelArgs, moe: bool) -> tuple[int, int]:
    ffn_total, ffn_active = _ffn(a, moe)
    common = _attention(a) + 2 * a.hidden_size  # plus the two block norms
    return common + ffn_total, common + ffn_active


def count_parameters(a: ModelArgs) -> ParamCounts:
    D, V = a.hidden_size, a.vocab_size
    embedding = V * D
    lm_head = 0 if a.tie_word_embeddings else V * D
    total, active = embedding + lm_head + D, lm_head + D
    for i in range(a.num_hidden_layers):
        t, act = _block(a, a.is_moe_layer(i))
        total, active = total + t, active + act
    mtp = mtp_active = 0
    for d in range(a.num_nextn_predict_layers):
        moe = a.n_routed_experts > 0 and a.num_hidden_layers + d >= a.first_k_dense_replace
        t, act = _block(a, moe)
        own = 3 * D + 2 * D * D  # enorm, hnorm, shared_head.norm; eh_proj
        mtp, mtp_active = mtp + t + own, mtp_active + act + own + (V * D if not a.tie_word_embeddings else 0)
    mtp_checkpoint = mtp + a.num_nextn_predict_layers * (embedding + V * D)
    return ParamCounts(total, active, mtp, mtp_checkpoint, mtp_active, embedding, lm_head)


def training_flops_per_token(a: ModelArgs, seq_len: int) -> float:
    """Forward + backward FLOPs per token, the figure MFU divides by: 6 x activated matmul
    parameters, plus causal attention's scores and weighted values (half of seq_len^2 per
    head, summed over query-key and value head dims)."""
    attn = a.num_hidden_layers * 6 * (seq_len / 2) * a.num_attention_heads * (
        a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    return 6 * count_parameters(a).active + attn


def kv_cache_bytes_per_token(a: ModelArgs, bytes_per_value: int = 2) -> dict[str, int]:
    """Decode-cache bytes per token over all layers: MLA's latent + rope key vs plain MHA."""
    mla = (a.kv_lora_rank + a.qk_rope_head_dim) * a.num_hidden_layers * bytes_per_value
    mha = a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * a.num_hidden_layers * bytes_per_value
    return {"mla": mla, "mha": mha}
