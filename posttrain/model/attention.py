"""Multi-head latent attention (MLA), with a naive path for training and an absorbed path for decoding.

Keys and values come from one compressed latent per token, c_KV = kv_a_layernorm(W_DKV x)
(kv_lora_rank wide), plus one rope key shared by all heads (qk_rope_head_dim wide).

* Naive path (training, prefill without cache): expand the latent through kv_b_proj into
  per-head keys and values and run ordinary scaled-dot-product attention.
* Absorbed path (decoding with `LatentCache`): fold kv_b_proj's key half into the query and
  its value half into the output, so attention runs directly on the cached latents. The cache
  then holds only kv_lora_rank + qk_rope_head_dim numbers per token and layer, instead of
  H * (qk_head_dim + v_head_dim) for plain multi-head attention.

Both paths compute the same function; tests hold them to 1e-4 in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .kernels.mla_rope import mla_qkv
from .layers import RMSNorm, packed_linear
from .rope import apply_rope, softmax_scale


@dataclass
class LatentCache:
    """Per-layer decode cache: normalised KV latents and rotated rope keys, [B, S_max, *]."""

    kv_BSC: torch.Tensor
    pe_BSR: torch.Tensor


def build_attention_mask(
    q_positions_T: torch.Tensor,
    k_positions_S: torch.Tensor,
    key_padding_BS: torch.Tensor | None = None,
    segment_ids_BT: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, T, S], True = may attend.

    Causal by slot index; keys that are padding are hidden; with segment ids (packed samples)
    a query sees only keys of its own segment. A query always sees its own slot, so a row of
    left padding never ends up with no key at all (which would make softmax NaN).
    """
    allowed = k_positions_S[None, :] <= q_positions_T[:, None]  # [T, S]
    allowed = allowed[None]
    if key_padding_BS is not None:
        allowed = allowed & key_padding_BS[:, None, :].bool()
    if segment_ids_BT is not None:
        seg_k = segment_ids_BS if segment_ids_BS is not None else segment_ids_BT
        allowed = allowed & (segment_ids_BT[:, :, None] == seg_k[:, None, :])
    allowed = allowed | (k_positions_S[None, None, :] == q_positions_T[None, :, None])
    return allowed[:, None]


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.qk_dim = args.qk_head_dim
        dim = args.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=False)
        self.softmax_scale = softmax_scale(args)

    def _project_q(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))

    def _queries(self, x_BTD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x_BTD.shape
        q_BTHK = self._project_q(x_BTD).view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q_BTHK.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latents(self, x_BTD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """mask: bool [B|1, 1, T, S] (None = plain causal); with `cache`, S covers the cache
        up to cache_start + T and this call's latents are written at cache_start."""
        if cache is None:
            return self.o_proj(self._naive(x_BTD, cos, sin, mask).flatten(2))
        q_nope, q_pe = self._queries(x_BTD, cos, sin)
        kv_BTC, k_pe_BTR = self._latents(x_BTD, cos, sin)
        T = x_BTD.shape[1]
        end = cache_start + T
        cache.kv_BSC[:, cache_start:end] = kv_BTC.to(cache.kv_BSC.dtype)
        cache.pe_BSR[:, cache_start:end] = k_pe_BTR.to(cache.pe_BSR.dtype)
        out = self._absorbed(q_nope, q_pe, cache.kv_BSC[:, :end], cache.pe_BSR[:, :end], mask)
        return self.o_proj(out.flatten(2))

    def _naive(self, x_BTD, cos, sin, mask) -> torch.Tensor:
        """Attention over per-head keys and values expanded from the latents: [B, T, H, V].
        The query and latent projections read the same x and run as one GEMM where they can;
        `mla_qkv` rotates the rope parts and lays out q, k, v (one fused pass each way on CUDA)."""
        B, T, _ = x_BTD.shape
        H = self.n_heads
        q_in = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        both = packed_linear(x_BTD, q_in, self.kv_a_proj_with_mqa)  # one GEMM where it can
        if both is None:
            q, kv_a = self._project_q(x_BTD), self.kv_a_proj_with_mqa(x_BTD)
        else:
            q, kv_a = both.split([q_in.out_features, self.kv_a_proj_with_mqa.out_features], dim=-1)
            if self.q_lora_rank is not None:
                q = self.q_b_proj(self.q_a_layernorm(q))
        kv_lat, k_pe_BTR = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_lat)).view(B, T, H, self.nope_dim + self.v_dim)
        q, k, v = mla_qkv(q.view(B, T, H, self.qk_dim), kv, k_pe_BTR, cos, sin, self.nope_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
        )
        return out.transpose(1, 2)  # [B, T, H, V]

    def _absorbed(self, q_nope, q_pe, kv_BSC, pe_BSR, mask) -> torch.Tensor:
        H = self.n_heads
        w = _effective_weight(self.kv_b_proj).view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim:]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_k.to(q_nope.dtype))
        scores = torch.einsum("bthc,bsc->bhts", q_lat.float(), kv_BSC.float())
        scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe_BSR.float())
        scores = scores * self.softmax_scale
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out_lat = torch.einsum("bhts,bsc->bthc", probs, kv_BSC.float()).to(q_nope.dtype)
        return torch.einsum("bthc,hdc->bthd", out_lat, w_v.to(q_nope.dtype))


def _effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, including unmerged LoRA deltas (peft wraps the
    layer; the absorbed path multiplies with the matrix directly, so it must see them)."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight
    if hasattr(linear, "get_delta_weight") and not getattr(linear, "merged", False):
        for name in getattr(linear, "active_adapters", []):
            if name in getattr(linear, "lora_A", {}):
                weight = weight + linear.get_delta_weight(name)
    return weight
