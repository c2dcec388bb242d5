"""Grouped GEMM over experts: rows of `x` sorted by expert, one weight matrix per expert.

`torch._grouped_mm` runs all experts in one call on GPUs that support it (Hopper with bf16).
Support varies with torch version, device, dtype and alignment, so it is probed once per
(device type, dtype) on a tiny problem and checked against the per-expert loop; anything that
fails or disagrees falls back to the loop, which is always correct.

On CPU the loop is the default: torch 2.13's CPU `_grouped_mm` is correct but was measured
about 25x slower than the loop for 16 experts x 16k rows (0.2 s vs 8 ms).
The kernel selection (`train.kernels.grouped_mm`: torch | loop, kernels/selection.py) forces
one implementation (tests use it to check both).
"""

from __future__ import annotations

import torch

from .kernels import selection

_PROBED: dict[tuple[str, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `torch._grouped_mm`'s backward rejects stride-0 (expanded) gradients, which e.g. a
    `.sum()` downstream produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm_loop(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert over its slice of rows (offsets are cumulative ends)."""
    out = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[-1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            out[start:end] = x_MK[start:end] @ w_EKN[e]
        start = end
    return out


def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _PROBED:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(48, 32, generator=g).to(device, dtype)
                w = torch.randn(3, 32, 16, generator=g).to(device, dtype)
                offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=device)
                got = torch._grouped_mm(x, w, offs=offs).float()
                ref = grouped_mm_loop(x.float(), w.float(), offs)
                ok = bool(torch.allclose(got, ref, rtol=2e-2, atol=2e-1))
            except Exception:  # unsupported device/dtype/build: use the loop
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def use_torch_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    choice = selection.active().grouped_mm
    if choice == "loop":
        return False
    if choice == "auto" and device.type == "cpu":
        return False
    if choice == "torch" and not _grouped_mm_supported(device, dtype):
        raise RuntimeError(f"kernels.grouped_mm=torch: torch._grouped_mm does not run on {device} in {dtype}")
    return _grouped_mm_supported(device, dtype)


def _aligned(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """`_grouped_mm` needs every row stride (K and N) to be a multiple of 16 bytes."""
    elt = x_MK.element_size()
    return (x_MK.shape[1] * elt) % 16 == 0 and (w_EKN.shape[-1] * elt) % 16 == 0


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows grouped by expert) @ w[e] [K, N] for each group; offsets int32 cumulative ends."""
    if x_MK.shape[0] > 0 and _aligned(x_MK, w_EKN) and use_torch_grouped_mm(x_MK.device, x_MK.dtype):
        return _ContiguousGrad.apply(torch._grouped_mm(x_MK, w_EKN, offs=offsets_E.to(torch.int32)))
    return grouped_mm_loop(x_MK, w_EKN, offsets_E)
