"""The DeepSeek-V3 transformer: blocks, the model, the LM head and a scalar (reward/value) head.

`Transformer(args)(input_ids)` returns logits [B, T, vocab]. Training code calls `compute`,
which also returns the MTP per-depth losses and the MoE balance loss; the reward model calls
`score`. Parameter names follow the HF checkpoint with the `model.` prefix dropped and the
routed experts stacked (see checkpoint.py for the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .args import ModelArgs
from .attention import MLA, LatentCache, build_attention_mask
from .kernels.cross_entropy import cross_entropy
from .layers import MLP, RMSNorm
from .moe import MoE, RoutingSegments, sequence_ids
from .recompute import checkpointed
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, args: ModelArgs, layer_idx: int, moe: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        use_moe = args.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = MoE(args) if use_moe else MLP(args.hidden_size, args.intermediate_size)
        # recompute this block's activations in backward instead of keeping them (parallelize()
        # or the training config sets it)
        self.activation_checkpointing = False

    def forward(self, x, cos, sin, mask=None, cache: LatentCache | None = None, cache_start: int = 0,
                segment_ids=None):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpointed(self._forward, x, cos, sin, mask, None, 0, segment_ids)
        return self._forward(x, cos, sin, mask, cache, cache_start, segment_ids)

    def _forward(self, x, cos, sin, mask=None, cache: LatentCache | None = None, cache_start: int = 0,
                 segment_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, segment_ids) if isinstance(self.mlp, MoE) else self.mlp(h))


@torch.no_grad()
def init_parameter_(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """Normal(0, std) for matrices and embeddings, ones for the 1-D (RMSNorm) weights. The routed
    experts' stacked [gate; up] weight is drawn as two [E, I, D] tensors, gate then up: the
    generator's stream, and so a seeded model, is that of separate gate and up parameters."""
    if p.dim() < 2:
        p.fill_(1.0)
    elif name.endswith("experts.gate_up_proj"):
        for half in p.chunk(2, dim=1):
            half.copy_(torch.empty(half.shape, dtype=p.dtype, device=p.device).normal_(0.0, std, generator=generator))
    else:
        p.normal_(0.0, std, generator=generator)


@dataclass
class ModelOutput:
    """What `Transformer.compute` returns. Losses are means over non-ignored targets."""

    hidden: torch.Tensor                     # final normed hidden states [B, T, D]
    logits: torch.Tensor | None = None       # [B, T, vocab]
    loss: torch.Tensor | None = None         # next-token cross-entropy
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of sum_e f_e P_e, times alpha


@dataclass
class KVCache:
    """Latent decode caches for every layer plus the next write position."""

    layers: list[LatentCache]
    key_padding_BS: torch.Tensor  # bool [B, S_max]: True where a real token sits
    length: int = 0


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, scalar_head: bool = False):
        super().__init__()
        args.validate()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        from .mtp import MTPModule  # local import: mtp.py builds on Block

        self.mtp = nn.ModuleList(
            MTPModule(args, args.num_hidden_layers + d) for d in range(args.num_nextn_predict_layers)
        )
        self.score = nn.Linear(args.hidden_size, 1, bias=False) if scalar_head else None
        self.rotary = RotaryEmbedding(args)
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero bias."""
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            init_parameter_(name, p, std, generator)
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()

    # --------------------------------------------------------------- forward
    def _positions(self, input_ids, position_ids, attention_mask_BT, start: int = 0):
        B, T = input_ids.shape
        if position_ids is not None:
            return position_ids
        if attention_mask_BT is not None:
            # left padding: positions count real tokens only
            return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(start, start + T, device=input_ids.device)[None].expand(B, T)

    def trunk(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        routing_segments: RoutingSegments | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, D] (no cache).

        position_ids [B, T]: positions (default 0..T-1, or counted over attention_mask).
        segment_ids [B, T]: packed-sample ids; attention stays within a segment.
        attention_mask [B, T]: 1 for tokens, 0 for padding (keys that are padding are hidden).
        routing_segments: the sequences of segment_ids as `routing_segments_of` makes them,
        worked out ahead (e.g. on the CPU batch); without them packed segments cost the forward
        one host sync.
        """
        positions = self._positions(input_ids, position_ids, attention_mask)
        cos, sin = self.rotary(positions)
        mask = None
        if segment_ids is not None or attention_mask is not None:
            slots = torch.arange(input_ids.shape[1], device=input_ids.device)
            mask = build_attention_mask(slots, slots, attention_mask, segment_ids)
        h = self.embed_tokens(input_ids)
        if routing_segments is None:
            routing_segments = _routing_segments(segment_ids, attention_mask)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, segment_ids=routing_segments)
        return self.norm(h)

    def forward(self, input_ids, position_ids=None, segment_ids=None, attention_mask=None):
        """Logits [B, T, vocab]."""
        return self.lm_head(self.trunk(input_ids, position_ids, segment_ids, attention_mask))

    def compute(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        with_mtp: bool = True,
        return_logits: bool = True,
        routing_segments: RoutingSegments | None = None,
    ) -> ModelOutput:
        """Training forward. `labels[b, t]` is the target for position t (already shifted;
        IGNORE_INDEX = -100 is skipped). MTP depth k predicts labels[:, t + k] from position t.
        routing_segments: see `trunk`."""
        hidden = self.trunk(input_ids, position_ids, segment_ids, attention_mask, routing_segments)
        out = ModelOutput(hidden=hidden)
        logits = self.lm_head(hidden)
        if return_logits:
            out.logits = logits
        if labels is not None:
            out.loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX)
            if with_mtp and len(self.mtp):
                positions = self._positions(input_ids, position_ids, attention_mask)
                out.mtp_losses = self._mtp_losses(hidden, input_ids, labels, positions, segment_ids, attention_mask,
                                                  routing_segments)
        out.balance_loss = self.balance_loss()
        return out

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(input_ids[:, t + 1] | tokens <= t) under softmax(logits / temperature), float32
        [B, T - 1], at the positions marked in `positions` [B, T - 1] (default all; 0 elsewhere),
        and the entropy there when asked. Only the marked positions go through the LM head, in
        chunks (token_logprobs.py): no [B, T, vocab] tensor is made."""
        from .token_logprobs import chosen_token_logprobs

        hidden = self.trunk(input_ids, attention_mask=attention_mask)[:, :-1]
        B, T1 = hidden.shape[:2]
        pos = torch.ones(B, T1, dtype=torch.bool, device=hidden.device) if positions is None else positions.bool()
        logp, entropy = chosen_token_logprobs(self.lm_head, hidden[pos], input_ids[:, 1:][pos], self.args.vocab_size,
                                              temperature, with_entropy)
        out = hidden.new_zeros(B, T1, dtype=torch.float32).index_put((pos,), logp)
        if entropy is not None:
            entropy = hidden.new_zeros(B, T1, dtype=torch.float32).index_put((pos,), entropy)
        return out, entropy

    def balance_loss(self) -> torch.Tensor | None:
        """alpha * the MoE layers' sequence-wise balance losses from the last training forward
        (any head: LM, scalar); None in eval mode or when alpha = 0.

        The losses are taken, not read: every MoE module (trunk and MTP) drops its reference.
        A loss kept on a module holds the autograd graph of its forward, including the router
        weight's gradient accumulator, into the next step; a CUDA graph captured after an eager
        warm-up then meets an accumulator bound to the warm-up's stream and the capture fails."""
        losses = [l.mlp.balance_loss for l in self.layers if isinstance(l.mlp, MoE) and l.mlp.balance_loss is not None]
        for module in self.moe_layers():
            module.balance_loss = None
        if not (self.training and losses):
            return None
        return self.args.aux_loss_alpha * torch.stack(losses).sum()

    def _mtp_losses(self, hidden, input_ids, labels, positions, segment_ids, attention_mask, routing_segments=None):
        losses = []
        h = hidden
        B, T = input_ids.shape
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            n = T - k
            seg = segment_ids[:, :n] if segment_ids is not None else None
            pad = attention_mask[:, :n] if attention_mask is not None else None
            tgt = labels[:, k:]
            if segment_ids is not None:  # never predict across a packed-sample boundary
                tgt = torch.where(segment_ids[:, k:] != segment_ids[:, :n], IGNORE_INDEX, tgt)
            cos, sin = self.rotary(positions[:, :n])
            slots = torch.arange(n, device=input_ids.device)
            mask = build_attention_mask(slots, slots, pad, seg) if (seg is not None or pad is not None) else None
            if routing_segments is not None:  # the first n tokens of every row: ids stay a bound
                sub = RoutingSegments(routing_segments.seq_N.view(B, T)[:, :n].reshape(-1),
                                      routing_segments.num_sequences)
            else:
                sub = _routing_segments(seg, pad)
            h = module(h[:, :n], self.embed_tokens(input_ids[:, k:]), cos, sin, mask, segment_ids=sub)
            logits = self.lm_head(module.shared_head.norm(h))
            losses.append(cross_entropy(logits.flatten(0, 1), tgt.flatten(), IGNORE_INDEX))
        return losses

    # --------------------------------------------------------- scalar head
    def score_tokens(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Scalar head on every position, float32 [B, T]."""
        if self.score is None:
            raise RuntimeError("this model was built without a scalar head (Transformer(args, scalar_head=True))")
        hidden = self.trunk(input_ids, position_ids, segment_ids, attention_mask)
        return self.score(hidden).squeeze(-1).float()

    def score_sequences(self, input_ids, attention_mask) -> torch.Tensor:
        """Scalar score read at the last non-padding token of each row, float32 [B].

        Works for left and right padding: the last position whose mask is 1.
        """
        values = self.score_tokens(input_ids, attention_mask)
        T = input_ids.shape[1]
        last = (attention_mask.long() * torch.arange(1, T + 1, device=input_ids.device)).argmax(-1)
        return values.gather(1, last[:, None]).squeeze(1)

    # ---------------------------------------------------------- decoding
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed_tokens.weight
        dtype = dtype or p.dtype
        a = self.args
        layers = [
            LatentCache(
                torch.zeros(batch_size, max_len, a.kv_lora_rank, dtype=dtype, device=p.device),
                torch.zeros(batch_size, max_len, a.qk_rope_head_dim, dtype=dtype, device=p.device),
            )
            for _ in self.layers
        ]
        return KVCache(layers, torch.zeros(batch_size, max_len, dtype=torch.bool, device=p.device))

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed-path forward of the next T tokens (prefill or one step); appends to `cache`.

        position_ids [B, T]; token_mask [B, T] marks real tokens (False for left padding).
        Returns logits [B, T, vocab].
        """
        B, T = input_ids.shape
        start, end = cache.length, cache.length + T
        if end > cache.key_padding_BS.shape[1]:
            raise ValueError(f"cache holds {cache.key_padding_BS.shape[1]} tokens; need {end}")
        cache.key_padding_BS[:, start:end] = True if token_mask is None else token_mask.bool()
        cos, sin = self.rotary(position_ids)
        q_slots = torch.arange(start, end, device=input_ids.device)
        k_slots = torch.arange(end, device=input_ids.device)
        mask = build_attention_mask(q_slots, k_slots, cache.key_padding_BS[:, :end])
        h = self.embed_tokens(input_ids)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cos, sin, mask, layer_cache, start)
        cache.length = end
        return self.lm_head(self.norm(h))

    # ----------------------------------------------------------- helpers
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_parameters(self, include_mtp: bool = True) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if (not include_mtp and name.startswith("mtp.")) or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def _routing_segments(segment_ids, attention_mask):
    """Sequences for MoE load counting and the balance loss (padding -1), worked out once per
    forward so that the MoE layers run without host syncs (`moe.sequence_ids`)."""
    if segment_ids is None and attention_mask is None:
        return None
    if segment_ids is None:
        B, T = attention_mask.shape
        rows = torch.arange(B, device=attention_mask.device)[:, None].expand(B, T)
        return RoutingSegments(torch.where(attention_mask.bool(), rows, -1).reshape(-1), B)
    if attention_mask is not None:
        segment_ids = torch.where(attention_mask.bool(), segment_ids, -1)
    B, T = segment_ids.shape
    return sequence_ids(segment_ids, B, T, segment_ids.device)
