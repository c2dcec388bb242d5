"""Rotary position embedding with YaRN, in the interleaved-pair layout of the released weights.

DeepSeek-V3 rotates the rope part of queries and keys as complex numbers built from adjacent
pairs (x0, x1), (x2, x3), ... (the release's `view_as_complex`). Weights trained that way only
give the right attention scores when rotated that way, so this is the only layout built.

YaRN changes two things: per-frequency interpolation between the original and the
`factor`-stretched frequencies (a linear ramp between the beta_fast / beta_slow correction
dimensions), and attention temperature. The temperature has two parts that follow
transformers' DeepseekV3 exactly: cos/sin are scaled by `attention_factor`
(= mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1.0 for the release), and the
softmax scale is multiplied by mscale(factor, mscale_all_dim)**2 (see `softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension whose wavelength fits `num_rotations` times into `max_pos`."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies (float32, [rope_dim/2]) and the cos/sin scale."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    # float32 like the reference implementations, so angles agree to the last bit.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = args.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    low = math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency (high-frequency dims)
    inv_freq = (inv_freq / rs.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if rs.attention_factor is not None:
        scale = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        scale = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    else:
        scale = yarn_get_mscale(rs.factor)
    return inv_freq, float(scale)


def softmax_scale(args: ModelArgs) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)**2 under YaRN."""
    scale = args.qk_head_dim ** -0.5
    rs = args.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables every layer shares."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq, self.attention_factor = inv_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, rope_dim/2], float32."""
        angles = position_ids_BT[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x_BTHR: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim; works for [B, T, H, R] and [B, T, R] inputs.

    Computed in float32 and cast back, so bf16 activations lose no accuracy to the rotation.
    """
    if x_BTHR.dim() == 4:
        cos_BTR, sin_BTR = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    x = x_BTHR.float()
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x_even * cos_BTR - x_odd * sin_BTR, x_odd * cos_BTR + x_even * sin_BTR), dim=-1)
    return out.flatten(-2).to(x_BTHR.dtype)
