"""Grouped (per-expert) GEMM kernels, bf16 and FP8, against their torch references.

The Triton kernels run on CPU under Triton's interpreter, which needs TRITON_INTERPRET=1 set
before triton is first imported (triton decides then, for its own library functions too), so
this module sets it before importing the package. If triton was already imported in this
process without it, the kernel tests skip (the references still run). Shapes: 5 experts, one
without rows and some with row counts that are not multiples of the interpreter's 16-row
tiles, K=200 and N=72 (not multiples of 128 or of the tiles), a few rows past offsets[-1].
FP8 operands are quantised with the local `_quant_rows_ref` (1x128 tiles) and
posttrain.model.fp8.weight_quant (128x128 blocks).

Tolerances:
* kernel vs reference, float32 results: both accumulate exact products in float32 and differ
  only in summation order (~1e-6 relative of sums of |products| ~ K): rtol 1e-5, atol 1e-4;
* kernel vs reference, bf16 results: the float32 values above are rounded to bf16, which can
  land on adjacent bf16 numbers: one bf16 spacing, rtol 2**-7 (plus the float32 atol);
* bf16 reference vs float64: the output's round-to-nearest error is at most half a bf16
  spacing, <= 2**-8 relative: rtol 2**-8, atol 1e-4 for the float32 accumulation;
* FP8 references vs the float64 product of the unquantised inputs: e4m3 keeps 3 mantissa bits
  (elementwise relative error up to 2**-4, ~2.5% RMS per operand), so on random normal data
  the relative Frobenius error of the product is ~3.5-4%: bound 0.05.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

_TRITON_NOT_INTERPRETED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from posttrain.model.fp8 import FP8_DTYPE, FP8_MAX, weight_quant  # noqa: E402

gg = importlib.import_module("posttrain.model.kernels.grouped")

COUNTS = [37, 0, 64, 21, 50]   # expert 1 owns no rows; 37, 21, 50 are not multiples of 16
TAIL = 7                       # rows past offsets[-1], owned by no expert
K, N = 200, 72
F32_TOL = dict(rtol=1e-5, atol=1e-4)
BF16_TOL = dict(rtol=2**-7, atol=1e-4)


@pytest.fixture(scope="module")
def kernels():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.fail("triton is missing; it is a dev dependency: pip install -e '.[dev]'")
    if _TRITON_NOT_INTERPRETED:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")
    built = gg._kernels()
    if not built.interpret:
        pytest.fail("the kernels were built for the GPU, not the interpreter, in this process")
    return built


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _offsets(counts=COUNTS) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _quant_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dimension: x [R, C] -> (e4m3 [R, C], float32 dequant scales [R, ceil(C/128)])."""
    R, C = x.shape
    tiles = torch.nn.functional.pad(x.float(), (0, (-C) % 128)).view(R, -1, 128)
    s = tiles.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (tiles / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(R, -1)[:, :C].contiguous()
    return q, s


def _quant_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs = [weight_quant(w[e]) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _exact(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float64 per-expert x_e @ w[e].T, zeros for rows past offsets[-1]."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end].double() @ w[e].double().T
        start = end
    return out


def _exact_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    dw = torch.zeros(offsets.shape[0], dy.shape[1], x.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        dw[e] = dy[start:end].double().T @ x[start:end].double()
        start = end
    return dw


def _rel_fro(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


def _data(seed: int, dtype=torch.bfloat16):
    g = _gen(seed)
    offs = _offsets()
    M = int(offs[-1]) + TAIL
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(len(COUNTS), N, K, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, w, dy, offs


# ---------------------------------------------------------------- references against float64


def test_references_match_float64():
    x, w, dy, offs = _data(0)
    torch.testing.assert_close(gg.grouped_gemm_reference(x, w, offs).double(), _exact(x, w, offs),
                               rtol=2**-8, atol=1e-4)
    wt = w.transpose(1, 2)
    torch.testing.assert_close(gg.grouped_gemm_reference(dy, wt, offs).double(), _exact(dy, wt, offs),
                               rtol=2**-8, atol=1e-4)
    torch.testing.assert_close(gg.grouped_gemm_wgrad_reference(dy, x, offs).double(), _exact_wgrad(dy, x, offs),
                               **F32_TOL)


def test_fp8_references_close_to_unquantised_product():
    g = _gen(1)
    offs = _offsets()
    M = int(offs[-1]) + TAIL
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    w = torch.randn(len(COUNTS), N, K, generator=g)
    wq, ws = _quant_weights(w)
    xq, xs = _quant_rows_ref(x)
    got = gg.grouped_gemm_fp8_reference(xq, xs, wq, ws, offs, out_dtype=torch.float32)
    assert _rel_fro(got, _exact(x, w, offs)) < 0.05
    dyq, dys = _quant_rows_ref(dy)  # input gradient through the transposed weight blocks
    got = gg.grouped_gemm_fp8_reference(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), offs,
                                        out_dtype=torch.float32)
    assert _rel_fro(got, _exact(dy, w.transpose(1, 2), offs)) < 0.05

    layout = gg.pad_offsets_to(torch.tensor(COUNTS), 128, num_rows=int(offs[-1]))
    dyq_t, dys_t, xq_t, xs_t = _padded_transposed_quant(dy[: int(offs[-1])], x[: int(offs[-1])], layout)
    got = gg.grouped_gemm_wgrad_fp8_reference(dyq_t, dys_t, xq_t, xs_t, layout.offsets)
    assert _rel_fro(got, _exact_wgrad(dy, x, offs)) < 0.05


# ---------------------------------------------------------------- bf16 / fp32 kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_gemm_matches_reference(kernels, dtype, transposed):
    x, w, dy, offs = _data(2, dtype)
    if transposed:  # input gradient: dy_e @ w[e] through a strided view, out [M, K]
        x, w = dy, w.transpose(1, 2)
    got = gg.grouped_gemm(x, w, offs)
    ref = gg.grouped_gemm_reference(x, w, offs)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), **(BF16_TOL if dtype == torch.bfloat16 else F32_TOL))
    assert torch.equal(got[-TAIL:], torch.zeros_like(got[-TAIL:]))


def test_grouped_gemm_large_tiles_and_empty(kernels, monkeypatch):
    """GPU-sized tiles (one tile covers several experts' rows), then all experts empty."""
    monkeypatch.setitem(gg._INTERPRET_META, "fwd", dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64))
    x, w, _, offs = _data(3)
    torch.testing.assert_close(gg.grouped_gemm(x, w, offs).float(), gg.grouped_gemm_reference(x, w, offs).float(),
                               **BF16_TOL)
    got = gg.grouped_gemm(x, w, torch.zeros(len(COUNTS), dtype=torch.int32))
    assert torch.equal(got, torch.zeros_like(got))


def test_grouped_gemm_wgrad_matches_reference(kernels):
    x, _, dy, offs = _data(4)
    dy = dy.T.contiguous().T  # column-major view: strides are honoured
    got = gg.grouped_gemm_wgrad(dy, x, offs)
    ref = gg.grouped_gemm_wgrad_reference(dy, x, offs)
    assert got.shape == (len(COUNTS), N, K) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **F32_TOL)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # the expert without rows


# ---------------------------------------------------------------- FP8 kernels


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_gemm_fp8_matches_reference(kernels, transposed):
    x, w, dy, offs = _data(5, torch.float32)
    wq, ws = _quant_weights(w)
    if transposed:  # input gradient: dy quantised along N, weight blocks transposed
        (aq, a_s), wq, ws, out_dtype = _quant_rows_ref(dy), wq.transpose(1, 2), ws.transpose(1, 2), torch.float32
    else:
        (aq, a_s), out_dtype = _quant_rows_ref(x), torch.bfloat16
    got = gg.grouped_gemm_fp8(aq, a_s, wq, ws, offs, out_dtype=out_dtype)
    ref = gg.grouped_gemm_fp8_reference(aq, a_s, wq, ws, offs, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.float(), ref.float(), **(F32_TOL if transposed else BF16_TOL))
    assert torch.equal(got[-TAIL:], torch.zeros_like(got[-TAIL:]))


def _padded_transposed_quant(dy: torch.Tensor, x: torch.Tensor, layout: gg.PaddedLayout):
    """Scatter sorted rows into the 128-aligned layout (zero padding), quantise along M."""
    dy_p = dy.new_zeros(layout.num_rows, dy.shape[1]).index_copy_(0, layout.dest_rows, dy)
    x_p = x.new_zeros(layout.num_rows, x.shape[1]).index_copy_(0, layout.dest_rows, x)
    return (*_quant_rows_ref(dy_p.T), *_quant_rows_ref(x_p.T))


@pytest.mark.parametrize("n,k", [(N, K), (256, 256)])
def test_grouped_gemm_wgrad_fp8_matches_reference(kernels, n, k):
    g = _gen(6)
    counts = [130, 0, 64, 21, 50] if k == 256 else COUNTS  # 130: an expert spanning two scale tiles
    M = sum(counts)
    dy, x = torch.randn(M, n, generator=g), torch.randn(M, k, generator=g)
    layout = gg.pad_offsets_to(torch.tensor(counts), 128, num_rows=M)
    quant = _padded_transposed_quant(dy, x, layout)
    got = gg.grouped_gemm_wgrad_fp8(*quant, layout.offsets)
    ref = gg.grouped_gemm_wgrad_fp8_reference(*quant, layout.offsets)
    torch.testing.assert_close(got, ref, **F32_TOL)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert _rel_fro(got, _exact_wgrad(dy, x, _offsets(counts))) < 0.05


def test_grouped_gemm_wgrad_fp8_rejects_misaligned_offsets(kernels):
    g = _gen(7)
    dyq_t, dys_t = _quant_rows_ref(torch.randn(N, 256, generator=g))
    xq_t, xs_t = _quant_rows_ref(torch.randn(K, 256, generator=g))
    with pytest.raises(ValueError, match="multiple of 128"):
        gg.grouped_gemm_wgrad_fp8(dyq_t, dys_t, xq_t, xs_t, torch.tensor([128, 200, 256], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 128"):
        gg.grouped_gemm_wgrad_fp8_reference(dyq_t, dys_t, xq_t, xs_t, torch.tensor([100, 256], dtype=torch.int32))


# ---------------------------------------------------------------- padded layout


def test_pad_offsets_to():
    counts = torch.tensor([37, 0, 128, 129, 1])
    M = int(counts.sum())
    layout = gg.pad_offsets_to(counts, 128, num_rows=M)
    assert layout.offsets.dtype == torch.int32
    assert layout.offsets.tolist() == [128, 128, 256, 512, 640]
    assert layout.num_rows % 128 == 0 and layout.num_rows >= 640
    assert gg.pad_offsets_to(counts, 128, exact=True).num_rows == 640
    # Each expert's rows land, in order, at the start of its padded segment.
    expected, start, pstart = torch.empty(M, dtype=torch.int64), 0, 0
    for c, pend in zip(counts.tolist(), layout.offsets.tolist()):
        expected[start:start + c] = torch.arange(pstart, pstart + c)
        start, pstart = start + c, pend
    assert torch.equal(layout.dest_rows, expected)


def test_imports_and_references_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib, torch\n"
        "import posttrain.model.kernels\n"
        "gg = importlib.import_module('posttrain.model.kernels.grouped')\n"
        "x, w = torch.randn(6, 8), torch.randn(2, 4, 8)\n"
        "offs = torch.tensor([2, 6], dtype=torch.int32)\n"
        "assert gg.grouped_gemm_reference(x, w, offs).shape == (6, 4)\n"
        "try:\n"
        "    gg.grouped_gemm(x, w, offs)\n"
        "except RuntimeError as exc:\n"
        "    assert 'need triton' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
