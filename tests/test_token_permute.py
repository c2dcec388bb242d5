"""MoE token dispatch / combine (kernels/permute.py, model/dispatch.py).

* References against a float64 loop over tokens and slots: dispatch and its backward are
  copies and sums of K terms (exact in float64, so float32 references agree to 1e-6); combine's
  forward and backward against float64 autograd of the plain formula.
* Triton kernels (Triton's interpreter, on CPU) against the references: dispatch bitwise (a
  copy); sums over K in float32 in another order: 1e-6 relative for float32 outputs, one bf16
  spacing (2**-7 relative) for bf16 ones (the interpreter's float32 -> bf16 cast truncates). Rows that no slot owns (a padded layout) must be zero.
* Shapes: D = 200 (not a multiple of the interpreter's 32-wide chunks), K = 3 (padded to 4
  lanes) and K = 1, random routings with an expert that gets no token.
"""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest sets it first; kept for running this file alone

import pytest  # noqa: E402
import torch  # noqa: E402

from posttrain.model.dispatch import combine_tokens, dispatch_tokens, sorted_positions  # noqa: E402
from posttrain.model.kernels import pad_offsets_to  # noqa: E402

P = importlib.import_module("posttrain.model.kernels.permute")

D = 200


def _routing(N: int, K: int, E: int, seed: int, padded: bool):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E-1 gets none
    rows, _ = sorted_positions(idx)
    num_rows = N * K
    if padded:
        counts = torch.bincount(idx.flatten(), minlength=E)
        layout = pad_offsets_to(counts, 16, num_rows=N * K)
        rows, num_rows = layout.dest_rows[rows], layout.num_rows
    w = torch.rand(N, K, generator=g) + 0.1
    return rows, num_rows, w, g


def _loop_dispatch(x, rows, num_rows):
    buf = torch.zeros(num_rows, x.shape[1], dtype=torch.float64)
    for n in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            buf[rows[n, k]] = x[n].double()
    return buf


def _loop_gather_sum(buf, rows, w=None):
    out = torch.zeros(rows.shape[0], buf.shape[1], dtype=torch.float64)
    for n in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            out[n] += buf[rows[n, k]].double() * (1.0 if w is None else float(w[n, k]))
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_references_match_float64_loops(padded):
    rows, num_rows, w, g = _routing(N=23, K=3, E=6, seed=0, padded=padded)
    x = torch.randn(23, D, generator=g)
    buf = P.dispatch_reference(x, rows, num_rows)
    assert torch.equal(buf.double(), _loop_dispatch(x, rows, num_rows))
    dbuf = torch.randn(num_rows, D, generator=g)
    torch.testing.assert_close(P.dispatch_backward_reference(dbuf, rows).double(), _loop_gather_sum(dbuf, rows),
                               rtol=1e-6, atol=1e-6)
    y = torch.randn(num_rows, D, generator=g)
    torch.testing.assert_close(P.combine_reference(y, rows, w).double(), _loop_gather_sum(y, rows, w),
                               rtol=1e-6, atol=1e-6)
    res = torch.randn(23, D, generator=g)
    torch.testing.assert_close(P.combine_reference(y, rows, w, res).double(),
                               _loop_gather_sum(y, rows, w) + res.double(), rtol=1e-6, atol=1e-6)
    # backward against float64 autograd of the plain formula
    y64, w64 = y.double().requires_grad_(True), w.double().requires_grad_(True)
    dout = torch.randn(23, D, generator=g)
    (y64[rows] * w64[..., None]).sum(1).backward(dout.double())
    dy, dw = P.combine_backward_reference(dout, y, rows, w)
    torch.testing.assert_close(dy.double(), y64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-5)
    owned = torch.zeros(num_rows, dtype=torch.bool)
    owned[rows.flatten()] = True
    assert padded == bool((~owned).any())
    assert bool((dy[~owned] == 0).all()) and bool((buf[~owned] == 0).all())


@pytest.fixture(scope="module")
def interpreted():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.fail("triton is missing; it is a dev dependency: pip install -e '.[dev]'")
    if not P._kernels()[0]:
        pytest.fail("the permute kernels were built for the GPU, not the interpreter, in this process")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,padded", [(3, False), (3, True), (1, True)])
def test_triton_kernels_equal_the_references(interpreted, dtype, K, padded):
    N = 19
    rows, num_rows, w, g = _routing(N=N, K=K, E=7, seed=K + 10 * padded, padded=padded)
    x = torch.randn(N, D, generator=g).to(dtype)
    y = torch.randn(num_rows, D, generator=g).to(dtype)
    dbuf = torch.randn(num_rows, D, generator=g).to(dtype)
    dout = torch.randn(N, D, generator=g).to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)

    buf = P.dispatch_triton(x, rows, num_rows)
    assert buf.dtype == dtype and torch.equal(buf, P.dispatch_reference(x, rows, num_rows))
    torch.testing.assert_close(P.dispatch_backward_triton(dbuf, rows), P.dispatch_backward_reference(dbuf, rows), **tol)
    got = P.combine_triton(y, rows, w)
    assert got.dtype == dtype
    torch.testing.assert_close(got, P.combine_reference(y, rows, w), **tol)
    res = torch.randn(N, D, generator=g).to(dtype)
    torch.testing.assert_close(P.combine_triton(y, rows, w, res), P.combine_reference(y, rows, w, res), **tol)
    with pytest.raises(ValueError, match="residual must be"):
        P.combine_triton(y, rows, w, res[:-1])
    dy, dw = P.combine_backward_triton(dout, y, rows, w)
    dy_ref, dw_ref = P.combine_backward_reference(dout, y, rows, w)
    if dtype == torch.float32:
        assert torch.equal(dy, dy_ref)  # one fp32 product, rounded once in both
    else:  # the interpreter's fp32 -> bf16 cast truncates instead of rounding: one spacing
        torch.testing.assert_close(dy, dy_ref, rtol=2**-7, atol=0)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    # int32 rows and a strided x are accepted as well
    xs = torch.randn(N, 2 * D, generator=g).to(dtype)[:, ::2]
    assert torch.equal(P.dispatch_triton(xs, rows.to(torch.int32), num_rows), P.dispatch_reference(xs, rows, num_rows))


@pytest.mark.parametrize("padded", [False, True])
def test_weighted_dispatch_and_plain_combine(interpreted, padded):
    """The path where the gate weights travel with the rows: dispatch also writes each row's
    weight (zero on padding rows), its backward gathers the weights' gradient back per slot,
    and the combine is an unweighted sum; Triton against the references and a float64 loop."""
    N, K = 19, 3
    rows, num_rows, w, g = _routing(N=N, K=K, E=7, seed=40 + padded, padded=padded)
    x = torch.randn(N, D, generator=g)
    buf, row_w = P.dispatch_triton(x, rows, num_rows, w)
    buf_ref, row_w_ref = P.dispatch(x, rows, num_rows, w)  # CPU: the references
    assert torch.equal(buf, buf_ref) and torch.equal(row_w, row_w_ref)
    for n in range(N):
        for k in range(K):
            assert row_w[rows[n, k]] == w[n, k]
    owned = torch.zeros(num_rows, dtype=torch.bool)
    owned[rows.flatten()] = True
    assert bool((row_w[~owned] == 0).all())
    dbuf, drow_w = torch.randn(num_rows, D, generator=g), torch.randn(num_rows, generator=g)
    dx, dw = P.dispatch_backward_triton(dbuf, rows, drow_w)
    dx_ref, dw_ref = P.dispatch_backward(dbuf, rows, drow_w)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(dw, drow_w[rows]) and torch.equal(dw_ref, dw)
    y = torch.randn(num_rows, D, generator=g)
    torch.testing.assert_close(P.combine_triton(y, rows, None), _loop_gather_sum(y, rows).float(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(P.combine(y, rows, None), _loop_gather_sum(y, rows).float(), rtol=1e-6, atol=1e-6)


def test_weighted_dispatch_autograd_matches_float64():
    """dispatch_weighted_tokens -> (rows times their weight, a row-wise function) -> plain
    combine: the same sum as weighting in the combine, with gradients for x and w."""
    from posttrain.model.dispatch import dispatch_weighted_tokens
    rows, num_rows, w, g = _routing(N=17, K=3, E=5, seed=4, padded=True)
    x = torch.randn(17, D, generator=g)
    dout = torch.randn(17, D, generator=g)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    buf, row_w = dispatch_weighted_tokens(xa, rows, wa, num_rows)
    out = combine_tokens(torch.tanh(buf) * row_w[:, None], rows, None)
    out.backward(dout)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = (torch.tanh(x64)[:, None] * w64[..., None]).sum(1)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    # only the weights used: the gradient still reaches w
    wb = w.clone().requires_grad_(True)
    _, rw = dispatch_weighted_tokens(x, rows, wb, num_rows)
    (rw * torch.arange(num_rows, dtype=torch.float32)).sum().backward()
    assert torch.equal(wb.grad, rows.float())


def test_padding_rows_are_zeroed_one_by_one(interpreted):
    """With the layout given (pad = (counts, offsets)), dispatch writes zeros into exactly the
    rows no slot owns, found from counts and offsets alone: checked on a buffer of NaNs (owned
    rows untouched), against the ownership the rows themselves give, and through dispatch."""
    from posttrain.model.kernels.route import slot_layout_reference
    g = torch.Generator().manual_seed(50)
    N, K, E = 23, 3, 6
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E-1: none
    lay = slot_layout_reference(idx, E, multiple=16)
    owned = torch.zeros(lay.num_rows, dtype=torch.bool)
    owned[lay.rows.flatten()] = True
    assert lay.num_rows > int(lay.offsets[-1])  # rows past the last end exist too
    pad_mask = P.padding_rows_reference(lay.num_rows, lay.counts, lay.offsets)
    assert torch.equal(pad_mask, ~owned)
    buf = torch.full((lay.num_rows, D), float("nan"))
    row_w = torch.full((lay.num_rows,), float("nan"))
    P._zero_pad_rows(buf, row_w, (lay.counts, lay.offsets), interpret=True)
    assert bool((buf[~owned] == 0).all()) and bool(buf[owned].isnan().all())
    assert bool((row_w[~owned] == 0).all()) and bool(row_w[owned].isnan().all())
    x, w = torch.randn(N, D, generator=g), torch.rand(N, K, generator=g)
    got, got_w = P.dispatch_triton(x, lay.rows, lay.num_rows, w, pad=(lay.counts, lay.offsets))
    assert torch.equal(got, P.dispatch_reference(x, lay.rows, lay.num_rows))
    assert torch.equal(got_w, P.row_weights_reference(w, lay.rows, lay.num_rows))


def test_triton_kernels_without_tokens(interpreted):
    rows = torch.empty(0, 3, dtype=torch.int64)
    assert P.dispatch_triton(torch.randn(0, D), rows, 0).shape == (0, D)
    assert P.combine_triton(torch.randn(0, D), rows, torch.rand(0, 3)).shape == (0, D)
    dy, dw = P.combine_backward_triton(torch.randn(0, D), torch.randn(0, D), rows, torch.rand(0, 3))
    assert dy.shape == (0, D) and dw.shape == (0, 3)


def test_autograd_matches_float64_gather_formulation():
    """dispatch -> (a row-wise function) -> combine, against the plain indexing in float64."""
    rows, num_rows, w, g = _routing(N=17, K=3, E=5, seed=3, padded=True)
    x = torch.randn(17, D, generator=g)
    scale = torch.randn(num_rows, 1, generator=g)
    dout = torch.randn(17, D, generator=g)

    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    # the residual: a function of x too, so its gradient joins x's
    out = combine_tokens(torch.tanh(dispatch_tokens(xa, rows, num_rows) * scale), rows, wa, xa.sin())
    out.backward(dout)

    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    buf = torch.zeros(num_rows, D, dtype=torch.float64).index_put((rows.flatten(),), x64[:, None].expand(-1, 3, -1).reshape(-1, D))
    ref = (torch.tanh(buf * scale.double())[rows] * w64[..., None]).sum(1) + x64.sin()
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_bad_rows_are_refused():
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="rows must be"):
        P.dispatch_reference(x, torch.zeros(5, 2, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="int32 or int64"):
        P.dispatch_reference(x, torch.zeros(4, 2), 8)
