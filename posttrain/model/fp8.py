"""Blockwise FP8 (e4m3) weight quantisation as the DeepSeek-V3 release stores it.

A weight [out, in] is cut into 128x128 blocks (the last row/column of blocks may be
smaller); each block b gets one float32 scale s_b = amax(|w_b|) / 448 and is stored as
e4m3 q_b = w_b / s_b. The checkpoint keeps s_b as `<name>.weight_scale_inv` (the inverse of
the quantisation multiplier), so dequantisation is w = q * s. These are the plain torch
references; Triton kernels for the GPU live in kernels/.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
# What the release writes into config.json for such a checkpoint (vLLM and transformers read it).
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = (-rows) % block, (-cols) % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if (pr or pc) else w


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (e4m3 weight [out, in], float32 scale_inv [ceil(out/b), ceil(in/b)])."""
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    padded = _pad_to_blocks(w.float(), block)
    R, C = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.view(R, block, C, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # zero padding never raises amax
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(R * block, C * block)[:rows, :cols].contiguous()
    return q, scale.float()


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block: int = BLOCK) -> torch.Tensor:
    """Inverse of `weight_quant`: e4m3 [out, in] times its per-block scale, in `dtype`."""
    rows, cols = q.shape
    R, C = -(-rows // block), -(-cols // block)
    if tuple(scale_inv.shape) != (R, C):
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {rows}x{cols} weight with "
            f"{block}x{block} blocks needs ({R}, {C})"
        )
    s = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (q.float() * s).to(dtype)
