"""Small building blocks shared by attention, MoE and the transformer: RMSNorm and the SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_training import FP8Linear, fp8_linear
from .kernels import selection
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
        gate_up = packed_linear(x, self.gate_proj, self.up_proj)
        if gate_up is not None:
            return self.down_proj(swiglu_packed(gate_up))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def packed_weight(*linears: nn.Module) -> torch.Tensor | None:
    """The weights of projections that read the same input, stacked [W_1; W_2; ...], when they
    can run as one GEMM (the input read once; in backward one input-gradient GEMM instead of one
    per projection and their sum): all plain or all FP8 projections, without bias or hooks (a
    LoRA wrapper or a hooked module runs on its own). FP8 needs every projection but the last to
    end on a 128-row boundary, so that the 128x128 weight blocks, and with them the numbers, stay
    those of the separate GEMMs. None: run them apart."""
    kind = type(linears[0])
    if kind not in (nn.Linear, FP8Linear):
        return None
    for m in linears:
        if type(m) is not kind or m.bias is not None or m._forward_hooks or m._forward_pre_hooks:
            return None
    if kind is FP8Linear and any(m.out_features % 128 for m in linears[:-1]):
        return None
    return torch.cat([m.weight for m in linears])


def packs(x: torch.Tensor) -> bool:
    """Pack on the GPU only, where it saves time. On CPU the projections run apart, which keeps
    the CPU numbers (and the CPU training runs the tests make) exactly those of separate GEMMs;
    summing in another order shifts a long CPU run's trajectory. kernels.packed=always covers
    the packed path on CPU (tests)."""
    return x.is_cuda or selection.active().packed == "always"


def packed_linear(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor | None:
    """x through the projections as one GEMM, outputs side by side along the last dim (split
    them with their out_features); None when they must run apart (`packed_weight`, or x on the
    CPU unless kernels.packed=always)."""
    if not packs(x):
        return None
    weight = packed_weight(*linears)
    if weight is None:
        return None
    return fp8_linear(x, weight) if type(linears[0]) is FP8Linear else F.linear(x, weight)
