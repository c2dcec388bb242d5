"""Small building blocks shared by attention, MoE and the transformer: RMSNorm and the SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_training import FP8Linear, fp8_linear
from .kernels.rmsnorm import rms_norm
from .kernels.swiglu import swiglu, swiglu_packed


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; the weight multiplies after the cast back, as the reference does.
    On CUDA one fused Triton pass each way (`kernels/rmsnorm.py`), elsewhere the torch ops."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Dense layers and the shared experts use it."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = self._packed_weight()
        if pack is not None:
            gate_up = fp8_linear(x, pack) if type(self.gate_proj) is not nn.Linear else F.linear(x, pack)
            return self.down_proj(swiglu_packed(gate_up))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def _packed_weight(self) -> torch.Tensor | None:
        """[W_gate; W_up] when gate and up can run as one GEMM (x read once, one input-gradient
        GEMM instead of two and their sum): both plain or both FP8 projections without bias or
        hooks (a LoRA wrapper or a hooked module runs on its own). FP8 needs the width to be a
        multiple of 128, so that the 128x128 weight blocks, and with them the numbers, stay those
        of the separate GEMMs. None: run them apart."""
        g, u = self.gate_proj, self.up_proj
        kind = type(g)
        if kind is not type(u) or kind not in (nn.Linear, FP8Linear) or g.bias is not None or u.bias is not None:
            return None
        if g._forward_hooks or g._forward_pre_hooks or u._forward_hooks or u._forward_pre_hooks:
            return None
        if kind is FP8Linear and g.out_features % 128:
            return None
        return torch.cat([g.weight, u.weight])
