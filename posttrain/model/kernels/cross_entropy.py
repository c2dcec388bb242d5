"""Token cross-entropy straight from the LM head's bf16 logits, forward and backward in one pass
each, with the float32 math of `F.cross_entropy(logits.float(), labels)`.

    loss = mean over rows with label != ignore_index of (logsumexp(logits_r) - logits_r[label_r])
    dlogits_r = g / count * (softmax(logits_r) - onehot(label_r))     (zero for ignored rows)

The torch path first makes a float32 copy of the logits, then a float32 log-softmax, and in
backward float32 gradients cast back: for 4 x 2048 tokens and a 32,000-word vocabulary that is
1 GiB per tensor and about seven passes over them. The kernels read the bf16 logits once per
pass (online max and sum of exponentials over vocabulary chunks) and write the gradient in the
logits' dtype; the forward keeps only a float32 logsumexp per row.

`cross_entropy` dispatches: Triton on CUDA, `F.cross_entropy` on a float32 copy elsewhere (the
tests run the kernels under TRITON_INTERPRET=1 on CPU). The mean over zero counted rows is NaN,
as in torch; a label outside [0, V) that is not ignore_index makes the loss NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import _use_triton, jit_kernels, require_triton

tl = None  # bound by _kernels(); the kernel bodies look it up as a module global
_KERNELS = None
_BLOCK_V = 4096


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy on a float32 copy of the logits [N, V] (mean over counted rows)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def _ce_fwd_kernel(logits_ptr, labels_ptr, lse_ptr, loss_ptr, V, stride_n, ignore_index,
                   BLOCK_V: tl.constexpr):
    """One program per row: online max / sum of exp over the vocabulary in chunks -> the row's
    logsumexp and loss (0 for an ignored row)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_n
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        # lanes that have seen only -inf subtract 0 instead (-inf - -inf would be NaN); s stays 0
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new_m
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    in_range = (label >= 0) & (label < V)
    target = tl.load(base + tl.where(in_range, label, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    # a label outside the vocabulary makes the loss NaN (torch raises a device-side assert;
    # checking on the host here would cost a sync every step)
    tl.store(loss_ptr + row, tl.where(counted, tl.where(in_range, lse - target, float("nan")), 0.0))


def _ce_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, dlogits_ptr, V, stride_n, stride_dn,
                   ignore_index, BLOCK_V: tl.constexpr):
    """One program per (row, vocabulary chunk): scale * (softmax - onehot); scale = dloss /
    count, read from a device scalar (no host sync)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    label = tl.load(labels_ptr + row)
    scale = tl.where(label != ignore_index, tl.load(scale_ptr), 0.0)
    x = tl.load(logits_ptr + row * stride_n + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - tl.load(lse_ptr + row))
    grad = scale * (p - tl.where(cols == label, 1.0, 0.0))
    tl.store(dlogits_ptr + row * stride_dn + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _kernels():
    """jit the kernels on first use (quant.jit_kernels: Triton is imported only then)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = jit_kernels(globals(), (), ("_ce_fwd_kernel", "_ce_bwd_kernel"))
    return _KERNELS


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [N, V] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy's logits must be contiguous along the vocabulary")


def cross_entropy_forward_triton(logits: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses [N] float32, 0 where ignored; logsumexp [N] float32)."""
    _check(logits, labels)
    require_triton(logits, labels)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _kernels()[0][(n,)](logits, labels, lse, loss, v, logits.stride(0), ignore_index,
                            BLOCK_V=_BLOCK_V, num_warps=8)
    return loss, lse


def cross_entropy_backward_triton(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                  scale: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """dlogits [N, V] in the logits' dtype; scale: a one-element float32 tensor (dloss / count)."""
    _check(logits, labels)
    require_triton(logits, labels, lse, scale)
    n, v = logits.shape
    dlogits = torch.empty_like(logits)
    if n:
        _kernels()[1][(n, -(-v // _BLOCK_V))](logits, labels, lse, scale, dlogits, v, logits.stride(0),
                                              dlogits.stride(0), ignore_index, BLOCK_V=_BLOCK_V, num_warps=8)
    return dlogits


class _CrossEntropyFn(torch.autograd.Function):
    """Mean token cross-entropy with the Triton kernels; saves the logits (not a float32 copy)
    and one logsumexp per row."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        loss_rows, lse = cross_entropy_forward_triton(logits, labels, ignore_index)
        count = (labels != ignore_index).sum().to(torch.float32)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, count = ctx.saved_tensors
        scale = (dloss.to(torch.float32) / count).reshape(1)
        return cross_entropy_backward_triton(logits, labels, lse, scale, ctx.ignore_index), None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype) against labels [N], skipping
    ignore_index, computed in float32: fused Triton passes on CUDA, F.cross_entropy elsewhere."""
    if not _use_triton(logits, labels):
        return cross_entropy_reference(logits, labels, ignore_index)
    return _CrossEntropyFn.apply(logits.contiguous(), labels.contiguous(), ignore_index)
