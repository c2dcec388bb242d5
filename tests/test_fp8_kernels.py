"""Blockwise FP8 kernels: torch references against float64, Triton kernels against the references.

The Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be set before
Triton builds a kernel, and setting it in this (shared) pytest process would turn every
Triton kernel imported afterwards, by any test, into an interpreted one. So the Triton
checks run in one subprocess started with TRITON_INTERPRET=1 (this file, run as a script);
each check is reported here as its own test.

Tolerances, and why:

* Quantisation, reference vs float64: q = RNE_e4m3(fl32(x / s)) with s = amax / 448. e4m3
  keeps 3 mantissa bits, so a normal value (|x/s| >= 2^-6) rounds with relative error
  <= 2^-4 (half an ulp), a subnormal one with absolute error <= 2^-10 (half their spacing
  2^-9); the fp32 division adds 2^-24 relative and q * s is exact in float64. Hence
  |x - q s| <= (2^-4 + 2^-20) |x| + 2^-10 s per element (the 2^-20 covers the fp32 steps).
* Quantisation, Triton vs reference: bitwise equal q and equal s. Both divide with IEEE
  round-to-nearest (`tl.math.div_rn`) and round to e4m3 with ties to even, so nothing may
  differ. The fused SwiGLU is the exception: Triton's exp and torch's differ in the last fp32
  bit, which moves s by an ulp (checked to 1e-6 relative) and can flip q to the neighbouring
  e4m3 value when silu(g) * u / s lies within an ulp of a rounding midpoint: allowed on at
  most 0.1% of elements, and never by more than one e4m3 step.
* GEMM: every path sums exact e4m3 products in fp32, so against the float64 product of the
  dequantised operands its error is at most (K + 8) 2^-24 sum_k |a_ik b_jk| (the standard
  bound for an fp32 sum of K terms, plus the scale multiplications and the sum over blocks);
  Triton vs reference is allowed twice that, since they sum in different orders, plus one
  ulp of a bf16 / fp16 output (a full ulp: the interpreter's fp32 -> bf16 cast truncates).
  Against the product of the unquantised random-normal inputs the relative Frobenius error
  is about 0.037 (two operands each rounded to 3 mantissa bits); the check is < 0.05.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from posttrain.model import fp8
from posttrain.model.kernels.selection import KernelSelection, selected
from posttrain.model import kernels as K
from posttrain.model.kernels import reference as R

FP8 = torch.float8_e4m3fn
Q = importlib.import_module("posttrain.model.kernels.quant")
G = importlib.import_module("posttrain.model.kernels.fp8_gemm")
WORKER_FLAG = "--fp8-interpret-worker"
SHAPES_MK = [(m, k) for m in (1, 37, 130) for k in (64, 128, 200, 257)]


# ----------------------------------------------------------------------------- helpers

def rand(shape, seed: int, dtype=torch.float32, wide: bool = False) -> torch.Tensor:
    """Seeded random data; `wide` spreads magnitudes over ~6 decades inside every tile, so
    small values land in e4m3's subnormal range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if wide:
        x = x * torch.exp(2.0 * torch.randn(shape, generator=g))
    return x.to(dtype)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def is_zero(q: torch.Tensor) -> bool:
    """All +-0 (silu(0) * up is -0 where up < 0), none NaN."""
    return bool((q.float() == 0).all())


def expand_cols(s: torch.Tensor, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, dim=-1)[..., :k]


def expand_blocks(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)[..., :n, :k]


def assert_within_e4m3(x64: torch.Tensor, q: torch.Tensor, s_full: torch.Tensor, rel_slack: float = 2**-20):
    s64 = s_full.double()
    err = (x64 - q.double() * s64).abs()
    bound = (2**-4 + rel_slack) * x64.abs() + 2**-10 * s64
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"


def assert_quant_equal(got, want):
    (q, s), (qr, sr) = got, want
    assert q.shape == qr.shape and s.shape == sr.shape, (q.shape, qr.shape, s.shape, sr.shape)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert torch.equal(codes(q), codes(qr)), f"{(codes(q) != codes(qr)).sum().item()} codes differ"
    assert torch.equal(s, sr), f"scales differ by up to {((s - sr).abs() / sr).max().item():.3e} relative"


def dequant_b(b_q, b_s, blockwise: bool) -> torch.Tensor:
    n, k = b_q.shape
    full = expand_blocks(b_s.double(), n, k) if blockwise else expand_cols(b_s.double(), k)
    return b_q.double() * full


def gemm_exact_and_bound(a_q, a_s, b_q, b_s, blockwise: bool):
    """float64 product of the dequantised operands, and the fp32 error bound of any path."""
    a = a_q.double() * expand_cols(a_s.double(), a_q.shape[1])
    b = dequant_b(b_q, b_s, blockwise)
    k = a_q.shape[1]
    return a @ b.t(), (k + 8) * 2**-24 * (a.abs() @ b.abs().t())


def assert_gemm_close(got, a_q, a_s, b_q, b_s, blockwise: bool, factor: float = 2.0):
    exact, bound = gemm_exact_and_bound(a_q, a_s, b_q, b_s, blockwise)
    # one ulp of the output dtype, not half: the interpreter's fp32 -> bf16 cast truncates
    # (the GPU's rounds to nearest)
    out_rounding = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[got.dtype]
    err = (got.double() - exact).abs()
    tol = factor * bound + out_rounding * exact.abs() + 1e-30
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e}"


# ----------------------------------------------------------------------------- references vs float64

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_reference_within_half_ulp(dtype):
    for i, (m, k) in enumerate(SHAPES_MK):
        x = rand((m, k), seed=100 + i, dtype=dtype, wide=True)
        q, s = R.act_quant(x)
        assert q.shape == (m, k) and s.shape == (m, -(-k // 128))
        assert_within_e4m3(x.double(), q, expand_cols(s, k))
        # each tile's largest element maps to exactly +-448
        pad = torch.nn.functional.pad(q.float().abs(), (0, s.shape[1] * 128 - k))
        assert bool((pad.view(m, -1, 128).amax(-1) == 448).all())
    x3 = rand((2, 5, 200), seed=7, dtype=dtype)
    q3, s3 = R.act_quant(x3)
    assert q3.shape == (2, 5, 200) and s3.shape == (2, 5, 2)
    assert_quant_equal((q3, s3), tuple(t.view(*x3.shape[:-1], -1) for t in R.act_quant(x3.view(10, 200))))


def test_act_quant_t_reference_is_act_quant_of_the_transpose():
    for i, (m, k) in enumerate(SHAPES_MK):
        x = rand((m, k), seed=200 + i, dtype=torch.bfloat16, wide=True)
        q_t, s_t = R.act_quant_t(x)
        assert q_t.shape == (k, m) and q_t.is_contiguous() and s_t.shape == (k, -(-m // 128))
        assert_quant_equal((q_t, s_t), R.act_quant(x.t().contiguous()))


def test_swiglu_reference_within_half_ulp():
    for i, (m, k) in enumerate(SHAPES_MK):
        gate, up = rand((m, k), seed=300 + i) * 4, rand((m, k), seed=400 + i, dtype=torch.bfloat16)
        q, s = R.swiglu_act_quant(gate, up)
        y64 = torch.nn.functional.silu(gate.double()) * up.double()
        # the fp32 product differs from float64 by a few fp32 ulps: 2^-18 relative slack
        assert_within_e4m3(y64, q, expand_cols(s, k), rel_slack=2**-18)


def test_weight_quant_reference_is_the_checkpoint_format():
    for i, (n, k) in enumerate([(16, 64), (130, 257), (256, 128), (1, 200)]):
        w = rand((n, k), seed=500 + i, dtype=torch.bfloat16, wide=True)
        q, s = R.weight_quant(w)
        assert_quant_equal((q, s), fp8.weight_quant(w))
        assert_within_e4m3(w.double(), q, expand_blocks(s, n, k))
    w3 = rand((3, 130, 200), seed=550)
    q3, s3 = R.weight_quant(w3)
    assert q3.shape == (3, 130, 200) and s3.shape == (3, 2, 2)
    for e in range(3):
        assert_quant_equal((q3[e], s3[e]), fp8.weight_quant(w3[e]))


def test_zero_tiles_quantise_to_zero_without_nan():
    floor = torch.tensor(1e-12) / 448
    x = rand((3, 300), seed=600)
    x[1, 128:256] = 0
    q, s = R.act_quant(x)
    assert is_zero(q[1, 128:256]) and s[1, 1] == floor and not s.isnan().any()
    x = rand((200, 5), seed=601)
    x[128:, 2] = 0
    q_t, s_t = R.act_quant_t(x)
    assert is_zero(q_t[2, 128:]) and s_t[2, 1] == floor
    w = rand((200, 300), seed=602)
    w[:128, 128:256] = 0
    q, s = R.weight_quant(w)
    assert is_zero(q[:128, 128:256]) and s[0, 1] == floor
    gate, up = rand((2, 256), seed=603), rand((2, 256), seed=604)
    gate[0, :128] = 0
    q, s = R.swiglu_act_quant(gate, up)
    assert is_zero(q[0, :128]) and s[0, 0] == floor


@pytest.mark.parametrize("blockwise", [True, False])
def test_gemm_reference_block_math_is_exact_to_fp32(blockwise):
    for i, (m, k) in enumerate(SHAPES_MK):
        for n in (16, 130):
            a_q, a_s = R.act_quant(rand((m, k), seed=700 + i, wide=True))
            b = rand((n, k), seed=800 + i + n, wide=True)
            b_q, b_s = R.weight_quant(b) if blockwise else R.act_quant(b)
            c = R.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, b_block=blockwise)
            assert c.shape == (m, n) and c.dtype == torch.float32
            assert_gemm_close(c, a_q, a_s, b_q, b_s, blockwise, factor=1.0)


@pytest.mark.parametrize("blockwise", [True, False])
def test_gemm_reference_close_to_the_unquantised_product(blockwise):
    a, b = rand((130, 520), seed=900), rand((144, 520), seed=901)
    a_q, a_s = R.act_quant(a)
    b_q, b_s = R.weight_quant(b) if blockwise else R.act_quant(b)
    c = R.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, b_block=blockwise).double()
    exact = a.double() @ b.double().t()
    rel = ((c - exact).norm() / exact.norm()).item()
    assert rel < 0.05, rel


def test_b_scale_layout_is_read_from_its_shape():
    b_q = torch.zeros(130, 200, dtype=FP8)
    assert R.resolve_b_block(b_q, torch.ones(2, 2), None) is True
    assert R.resolve_b_block(b_q, torch.ones(130, 2), None) is False
    with pytest.raises(ValueError, match="needs"):
        R.resolve_b_block(b_q, torch.ones(130, 2), True)
    with pytest.raises(ValueError, match="128x128"):
        R.resolve_b_block(b_q, torch.ones(3, 2), None)
    # N == 1: both readings scale the one row per 128 of K, so either gives the same product
    a_q, a_s = R.act_quant(rand((5, 200), seed=950))
    b1_q, b1_s = R.act_quant(rand((1, 200), seed=951))
    assert torch.equal(R.fp8_gemm(a_q, a_s, b1_q, b1_s, torch.float32, True),
                       R.fp8_gemm(a_q, a_s, b1_q, b1_s, torch.float32, False))


def test_cpu_dispatch_uses_the_references():
    x = rand((37, 200), seed=960, dtype=torch.bfloat16)
    assert_quant_equal(K.act_quant(x), R.act_quant(x))
    assert_quant_equal(K.act_quant_t(x), R.act_quant_t(x))
    assert_quant_equal(K.swiglu_act_quant(x, x), R.swiglu_act_quant(x, x))
    assert_quant_equal(K.weight_quant(x), R.weight_quant(x))
    a_q, a_s = R.act_quant(x)
    b_q, b_s = R.weight_quant(rand((48, 200), seed=961))
    want = R.fp8_gemm(a_q, a_s, b_q, b_s, torch.bfloat16, True)
    for mode in ("auto", "torch"):
        with selected(fp8_gemm=mode):
            assert torch.equal(K.fp8_matmul(a_q, a_s, b_q, b_s, b_block=True), want)
    with selected(fp8_gemm="cublas"), pytest.raises(G.ScaledMMUnsupported, match="CUDA"):
        K.fp8_matmul(a_q, a_s, b_q, b_s)
    with pytest.raises(ValueError, match="kernels.fp8_gemm='fastest'"):
        KernelSelection(fp8_gemm="fastest")
    if K.HAVE_TRITON and not Q.interpreting():
        with selected(fp8_gemm="triton"), pytest.raises(ValueError, match="CUDA tensors"):
            K.fp8_matmul(a_q, a_s, b_q, b_s)
    reason = G.scaled_mm_unsupported_reason(a_q, b_q, True, torch.bfloat16)
    assert reason and "CUDA" in reason


def test_package_imports_without_triton():
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from posttrain.model import kernels as K\n"
        "assert not K.HAVE_TRITON\n"
        "x = torch.randn(4, 200)\n"
        "q, s = K.act_quant(x)\n"
        "assert K.fp8_matmul(q, s, q, s).shape == (4, 4)\n"
        "try:\n"
        "    K.act_quant_triton(x)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------- Triton (interpreted)

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


@check
def check_act_quant_bitwise():
    for dtype in (torch.float32, torch.bfloat16):
        for i, (m, k) in enumerate(SHAPES_MK):
            x = rand((m, k), seed=1000 + i, dtype=dtype, wide=True)
            assert_quant_equal(K.act_quant_triton(x), R.act_quant(x))


@check
def check_act_quant_every_autotune_config():
    x = rand((130, 520), seed=1100, dtype=torch.bfloat16, wide=True)
    want = R.act_quant(x)
    for cfg in Q._ROW_CONFIGS:
        assert_quant_equal(K.act_quant_triton(x, config=cfg), want)


@check
def check_act_quant_strided_and_batched():
    x3 = rand((2, 19, 200), seed=1200, dtype=torch.bfloat16)
    assert_quant_equal(K.act_quant_triton(x3), R.act_quant(x3))
    wide = rand((37, 300), seed=1201)
    assert_quant_equal(K.act_quant_triton(wide[:, 5:205]), R.act_quant(wide[:, 5:205]))
    xt = rand((200, 37), seed=1202).t()  # column stride 37
    assert_quant_equal(K.act_quant_triton(xt), R.act_quant(xt))


@check
def check_e4m3_rounding_ties_and_subnormals():
    """With a 448 in the tile s is exactly 1, so q is the rounding of x itself: every midpoint
    between neighbouring e4m3 values (ties to even), one fp32 ulp either side, subnormals and
    values that round to (negative) zero."""
    grid = torch.arange(127, dtype=torch.uint8).view(FP8).float()  # +0 ... 448
    mids = (grid[:-1] + grid[1:]) / 2
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9)),
                      grid, torch.tensor([2.0**-11, 3 * 2.0**-11, 2.0**-12, 1e-30])])
    vals = torch.cat([vals, -vals])
    per_row = 127
    rows = -(-vals.numel() // per_row)
    x = torch.full((rows, 128), 1.0)
    x[:, 0] = 448.0
    flat = x[:, 1:].reshape(-1)
    flat[: vals.numel()] = vals
    x[:, 1:] = flat.view(rows, per_row)
    q, s = K.act_quant_triton(x)
    assert bool((s == 1).all())
    assert torch.equal(codes(q), codes(x.to(FP8)))
    assert_quant_equal((q, s), R.act_quant(x))


@check
def check_act_quant_t_bitwise():
    for dtype in (torch.float32, torch.bfloat16):
        for i, (m, k) in enumerate(SHAPES_MK):
            x = rand((m, k), seed=1300 + i, dtype=dtype, wide=True)
            assert_quant_equal(K.act_quant_t_triton(x), R.act_quant_t(x))
    x = rand((300, 200), seed=1350, dtype=torch.bfloat16)
    for cfg in Q._T_CONFIGS:
        assert_quant_equal(K.act_quant_t_triton(x, config=cfg), R.act_quant_t(x))
    xt = rand((200, 300), seed=1351).t()  # a strided view, never made contiguous
    assert_quant_equal(K.act_quant_t_triton(xt), R.act_quant_t(xt))


@check
def check_swiglu_act_quant_within_one_step():
    cases = [((m, k), torch.float32) for m, k in [(1, 64), (37, 200), (130, 257)]]
    cases += [((2, 19, 200), torch.bfloat16), ((130, 257), torch.bfloat16)]
    for i, (shape, dtype) in enumerate(cases):
        gate = (rand(shape, seed=1400 + i) * 4).to(dtype)
        up = rand(shape, seed=1450 + i, dtype=dtype)
        (q, s), (qr, sr) = K.swiglu_act_quant_triton(gate, up), R.swiglu_act_quant(gate, up)
        assert q.shape == qr.shape and s.shape == sr.shape
        assert bool(((s - sr).abs() <= 1e-6 * sr).all())
        c, cr = codes(q).int(), codes(qr).int()
        assert bool((((c ^ cr) & 0x80) == 0).all())  # never a sign flip
        step = ((c & 0x7F) - (cr & 0x7F)).abs()
        assert int(step.max()) <= 1 and (step > 0).float().mean().item() <= 1e-3
    for cfg in Q._ROW_CONFIGS[:2]:
        gate, up = rand((40, 300), seed=1490) * 4, rand((40, 300), seed=1491)
        q, s = K.swiglu_act_quant_triton(gate, up, config=cfg)
        qr, sr = R.swiglu_act_quant(gate, up)
        assert bool(((s - sr).abs() <= 1e-6 * sr).all())
        assert (codes(q) != codes(qr)).float().mean().item() <= 1e-3


@check
def check_swiglu_act_quant_t_within_one_step():
    """The transposed SwiGLU quantisation (gate/up as strided halves of one tensor, as the FP8
    experts pass them) against act_quant_t of the fp32 product: same rules as the row form."""
    for i, (m, k, dtype) in enumerate([(37, 200, torch.float32), (300, 130, torch.bfloat16)]):
        gu = (rand((m, 2 * k), seed=1470 + i) * 3).to(dtype)
        gate, up = gu[:, :k], gu[:, k:]
        (q, s), (qr, sr) = K.swiglu_act_quant_t_triton(gate, up), R.act_quant_t(R.swiglu(gate, up))
        assert q.shape == qr.shape == (k, m) and s.shape == sr.shape
        assert bool(((s - sr).abs() <= 1e-6 * sr).all())
        c, cr = codes(q).int(), codes(qr).int()
        assert bool((((c ^ cr) & 0x80) == 0).all())
        step = ((c & 0x7F) - (cr & 0x7F)).abs()
        assert int(step.max()) <= 1 and (step > 0).float().mean().item() <= 1e-3
        assert torch.equal(codes(K.swiglu_act_quant_t(gate, up)[0]), codes(qr))  # CPU dispatch: the reference


@check
def check_weight_quant_is_the_checkpoint_format_bitwise():
    for i, (n, k) in enumerate([(16, 64), (130, 257), (256, 128), (1, 200)]):
        for dtype in (torch.float32, torch.bfloat16):
            w = rand((n, k), seed=1500 + i, dtype=dtype, wide=True)
            assert_quant_equal(K.weight_quant_triton(w), fp8.weight_quant(w))
    w3 = rand((3, 130, 200), seed=1550, dtype=torch.bfloat16)
    q3, s3 = K.weight_quant_triton(w3)
    assert q3.shape == (3, 130, 200) and s3.shape == (3, 2, 2)
    for e in range(3):
        assert_quant_equal((q3[e], s3[e]), fp8.weight_quant(w3[e]))
    wt = rand((257, 130), seed=1551).t()  # strided
    assert_quant_equal(K.weight_quant_triton(wt), fp8.weight_quant(wt))


@check
def check_weight_quant_t_writes_both_layouts_bitwise():
    """The experts' quantisation with its transposed copy: q and s equal weight_quant of the
    concatenation, q_t / s_t equal their transposes, for 128-aligned parts (quantised apart,
    written into one buffer), a ragged last part, and misaligned parts (joined first)."""
    cases = [
        [rand((2, 128, 200), seed=1560, dtype=torch.bfloat16), rand((2, 130, 200), seed=1561, dtype=torch.bfloat16)],
        [rand((3, 72, 257), seed=1562, wide=True)],
        [rand((2, 72, 200), seed=1563, dtype=torch.bfloat16), rand((2, 72, 200), seed=1564, dtype=torch.bfloat16)],
    ]
    for ws in cases:
        q, s, q_t, s_t = K.weight_quant_t_triton(ws)
        want_q, want_s = R.weight_quant(torch.cat(ws, 1))
        assert_quant_equal((q, s), (want_q, want_s))
        assert q_t.is_contiguous() and s_t.is_contiguous()
        assert torch.equal(codes(q_t), codes(want_q.transpose(1, 2).contiguous()))
        assert torch.equal(s_t, want_s.transpose(1, 2))
        ref = R.weight_quant_t(ws)
        for got, exp in zip((q, q_t), (ref[0], ref[2])):
            assert torch.equal(codes(got), codes(exp))
        assert torch.equal(s, ref[1]) and torch.equal(s_t, ref[3])


@check
def check_zero_tiles_and_nan():
    floor = torch.tensor(1e-12) / 448
    x = rand((3, 300), seed=1600)
    x[1, 128:256] = 0
    q, s = K.act_quant_triton(x)
    assert is_zero(q[1, 128:256]) and s[1, 1] == floor and not s.isnan().any()
    xt = rand((200, 5), seed=1601)
    xt[128:, 2] = 0
    q_t, s_t = K.act_quant_t_triton(xt)
    assert is_zero(q_t[2, 128:]) and s_t[2, 1] == floor and not s_t.isnan().any()
    w = rand((200, 300), seed=1602)
    w[:128, 128:256] = 0
    qw, sw = K.weight_quant_triton(w)
    assert is_zero(qw[:128, 128:256]) and sw[0, 1] == floor
    gate, up = rand((2, 256), seed=1603), rand((2, 256), seed=1604)
    gate[0, :128] = 0
    qg, sg = K.swiglu_act_quant_triton(gate, up)
    assert is_zero(qg[0, :128]) and sg[0, 0] == floor
    # a GEMM over zero tiles is finite and still matches the reference
    c = K.fp8_gemm_triton(q, s, qw, sw, torch.float32, b_block=True)
    assert bool(torch.isfinite(c).all())
    assert_gemm_close(c, q, s, qw, sw, True)
    # NaN is not dropped by the amax (plain tl.max would ignore it): the tile's scale is NaN,
    # so the GEMM output is NaN, as with the references. (q itself is not compared: the
    # interpreter's fp8 conversion does not produce e4m3 NaN.)
    x = rand((4, 300), seed=1605)
    x[2, 140] = float("nan")
    _, s = K.act_quant_triton(x)
    assert torch.equal(s.isnan(), R.act_quant(x)[1].isnan()) and bool(s[2, 1].isnan())
    _, s_t = K.act_quant_t_triton(x)
    assert torch.equal(s_t.isnan(), R.act_quant_t(x)[1].isnan()) and bool(s_t[140, 0].isnan())
    w[150, 10] = float("nan")
    assert torch.equal(K.weight_quant_triton(w)[1].isnan(), R.weight_quant(w)[1].isnan())


@check
def check_gemm_matches_reference():
    for i, (m, k) in enumerate(SHAPES_MK):
        a_q, a_s = R.act_quant(rand((m, k), seed=1700 + i, wide=True))
        for n in (16, 130):
            b = rand((n, k), seed=1750 + i + n, dtype=torch.bfloat16, wide=True)
            for blockwise in (True, False):
                b_q, b_s = R.weight_quant(b) if blockwise else R.act_quant(b)
                c = K.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32, b_block=blockwise)
                assert c.shape == (m, n) and c.dtype == torch.float32
                assert_gemm_close(c, a_q, a_s, b_q, b_s, blockwise)
                ref = R.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, b_block=blockwise)
                assert_gemm_close(ref, a_q, a_s, b_q, b_s, blockwise, factor=1.0)


@check
def check_gemm_every_autotune_config():
    a_q, a_s = R.act_quant(rand((130, 257), seed=1800))
    b = rand((130, 257), seed=1801)
    for blockwise in (True, False):
        b_q, b_s = R.weight_quant(b) if blockwise else R.act_quant(b)
        for cfg in G._GEMM_CONFIGS:
            c = K.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32, b_block=blockwise, config=cfg)
            assert_gemm_close(c, a_q, a_s, b_q, b_s, blockwise)


@check
def check_gemm_training_layouts():
    """The three GEMMs of a linear layer, with the operands exactly as training passes them."""
    x = rand((150, 200), seed=1900, dtype=torch.bfloat16)
    w = rand((130, 200), seed=1901, dtype=torch.bfloat16)
    dy = rand((150, 130), seed=1902, dtype=torch.bfloat16)
    w_q, w_s = K.weight_quant_triton(w)
    x_q, x_s = K.act_quant_triton(x)
    y = K.fp8_gemm_triton(x_q, x_s, w_q, w_s, torch.float32, b_block=True)                  # y = x W^T
    assert_gemm_close(y, x_q, x_s, w_q, w_s, True)
    dy_q, dy_s = K.act_quant_triton(dy)
    dx = K.fp8_gemm_triton(dy_q, dy_s, w_q.t(), w_s.t(), torch.float32, b_block=True)     # dx = dy W
    assert_gemm_close(dx, dy_q, dy_s, w_q.t(), w_s.t(), True)
    assert_gemm_close(dx, dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), True)
    dy_qt, dy_st = K.act_quant_t_triton(dy)
    x_qt, x_st = K.act_quant_t_triton(x)
    dw = K.fp8_gemm_triton(dy_qt, dy_st, x_qt, x_st, torch.float32, b_block=False)         # dW = dy^T x
    assert dw.shape == (130, 200)
    assert_gemm_close(dw, dy_qt, dy_st, x_qt, x_st, False)
    wide_q, wide_s = R.act_quant(rand((37, 400), seed=1903))
    a_q, a_s = wide_q[:, 128:384], wide_s[:, 1:3]                                      # strided a
    b_q, b_s = R.weight_quant(rand((16, 256), seed=1904))
    assert_gemm_close(K.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32), a_q, a_s, b_q, b_s, True)


@check
def check_gemm_output_dtypes_and_empty():
    a_q, a_s = R.act_quant(rand((37, 257), seed=2000))
    b_q, b_s = R.weight_quant(rand((130, 257), seed=2001))
    for dtype in (torch.bfloat16, torch.float16):
        c = K.fp8_gemm_triton(a_q, a_s, b_q, b_s, dtype)
        assert c.dtype == dtype
        assert_gemm_close(c, a_q, a_s, b_q, b_s, True)
    z_q, z_s = R.act_quant(torch.empty(0, 257))
    assert K.fp8_gemm_triton(z_q, z_s, b_q, b_s).shape == (0, 130)
    e_q, e_s = K.act_quant_triton(torch.empty(0, 200))
    assert e_q.shape == (0, 200) and e_s.shape == (0, 2)
    e_q, e_s = K.act_quant_t_triton(torch.empty(0, 200))
    assert e_q.shape == (200, 0) and e_s.shape == (200, 0)


def _worker(out_path: str) -> None:
    """Runs every check under the interpreter; writes {name: None | traceback} as JSON."""
    results: dict = {}
    if not K.HAVE_TRITON:
        results["__skip__"] = "triton is not installed"
    elif not Q.interpreting():
        results["__skip__"] = "the worker was started without TRITON_INTERPRET=1"
    else:
        try:
            K.act_quant_triton(torch.ones(1, 128))
        except Exception as exc:  # noqa: BLE001 - any failure here means no interpreter
            results["__skip__"] = f"Triton's interpreter cannot run on this machine: {exc!r}"
    if "__skip__" not in results:
        for name, fn in CHECKS.items():
            t0 = time.perf_counter()
            try:
                fn()
                results[name] = None
            except Exception:  # noqa: BLE001 - reported per check by the parent
                results[name] = traceback.format_exc()
            results.setdefault("__seconds__", {})[name] = round(time.perf_counter() - t0, 2)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not K.HAVE_TRITON:
        pytest.fail("triton is missing; it is a dev dependency: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("fp8_interpret") / "results.json"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=500)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stderr[-5000:]}")
    results = json.loads(out.read_text())
    if "__skip__" in results:
        pytest.fail(results["__skip__"])  # the worker is always started with the interpreter on
    return results


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_under_interpreter(interpreted, name):
    err = interpreted.get(name, "check did not run")
    if err:
        pytest.fail(f"{name} ({interpreted['__seconds__'].get(name)} s):\n{err}", pytrace=False)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
    _worker(sys.argv[2])


def test_padded_block_scale_keeps_every_block_scale_in_the_layout_scaled_mm_wants():
    """K/128 = 22: torch.nn.functional.scaled_mm takes the 128x128 scale as [24, N/128], the
    transpose of a row-major buffer whose rows are padded to a multiple of 4."""
    b_s = torch.rand(16, 22, generator=torch.Generator().manual_seed(3)) + 0.5
    padded = G._padded_block_scale(b_s.t().contiguous().t())  # as ws.t() arrives in the input gradient
    assert padded.shape == (24, 16) and padded.stride() == (1, 24)
    assert torch.equal(padded[:22].t(), b_s)
    assert torch.equal(padded[22:], torch.zeros(2, 16))
