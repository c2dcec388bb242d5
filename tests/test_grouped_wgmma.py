"""The Gluon grouped FP8 kernel (kernels/grouped_wgmma.py) on CPU: it cannot run here (Gluon has
no interpreter), so these tests check what can be checked without a GPU: both kernels compile
to Hopper machine code with this Triton, the tile-to-expert map, the operand checks, and the
fallback to the Triton kernel. The numbers are checked on the GPU by
benchmarks/bench_grouped_wgmma.py against the torch reference."""

from __future__ import annotations

import re

import pytest
import torch

from posttrain.model import kernels as K
from posttrain.model.kernels import grouped
from posttrain.model.kernels import grouped_wgmma as gw


def _fp8_operands(counts, Kd, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = K.pad_offsets_to(torch.tensor(counts), 128)
    x = torch.randn(layout.num_rows, Kd, generator=g)
    w = torch.randn(len(counts), N, Kd, generator=g) * 0.02
    xq, xs = K.reference.act_quant(x)
    wq, ws = K.reference.weight_quant(w)
    return layout, xq, xs, wq, ws


def test_tile_experts_match_the_padded_segments():
    counts = [300, 0, 129, 1, 640, 0, 77]
    layout = K.pad_offsets_to(torch.tensor(counts), 128)
    M = layout.num_rows + 256  # two tiles past the last expert
    got = gw.tile_experts(layout.offsets, M).tolist()
    ends = layout.offsets.tolist()
    want = []
    for row0 in range(0, M, 128):
        owner = next((e for e, end in enumerate(ends) if row0 < end), len(counts))
        want.append(owner)
    assert got == want
    assert want.count(len(counts)) >= 2 and 1 not in want and 5 not in want  # empty experts own no tile


def test_operand_checks_say_what_tma_needs():
    layout, xq, xs, wq, ws = _fp8_operands([130, 5], 256, 256)
    gw.check_wgmma_operands(xq, xs, wq, ws, torch.bfloat16)  # a valid call passes
    with pytest.raises(ValueError, match="contiguous"):
        gw.check_wgmma_operands(xq, xs, wq.transpose(1, 2), ws.transpose(1, 2), torch.bfloat16)
    _, xq2, xs2, wq2, ws2 = _fp8_operands([130, 5], 200, 256)
    with pytest.raises(ValueError, match="K % 16"):
        gw.check_wgmma_operands(xq2, xs2, wq2, ws2, torch.bfloat16)
    with pytest.raises(ValueError, match="scales"):
        gw.check_wgmma_operands(xq, xs[:, :1], wq, ws, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        gw.check_wgmma_operands(xq, xs, wq, ws, torch.int8)


def _gluon():
    # Without Triton at all (not Linux) there is nothing to compile; with a Triton that lacks
    # Gluon the FP8 experts would silently fall back to the slower kernel, so that fails here.
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    return GPUTarget, gl, GluonASTSource


@pytest.mark.parametrize("variant", ["plain", "ws"])
def test_kernels_compile_to_hopper_code(variant):
    """Both kernels build for sm_90a with the installed Triton (no GPU needed): the FP8 wgmma
    instructions are there, and the warp-specialised kernel redistributes registers."""
    GPUTarget, gl, GluonASTSource = _gluon()
    import triton
    kernels = gw._build()
    fp8 = gl.float8e4nv

    def desc(dtype_name, shape, gl_dtype):
        layout = gl.NVMMASharedLayout.get_default_for(shape, gl_dtype)
        return f"tensordesc<{dtype_name}[{shape[0]},{shape[1]}],{layout!r}>"

    c_rows = 128 if variant == "plain" else 64
    sig = {"a_desc": desc("fp8e4nv", [128, 128], fp8), "b_desc": desc("fp8e4nv", [128, 128], fp8),
           "c_desc": desc("bf16", [c_rows, 128], gl.bfloat16), "xs_ptr": "*fp32", "ws_ptr": "*fp32",
           "tile_expert_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "E": "i32", "tiles_n": "i32"}
    sig.update({k: "i32" for k in ("stride_xsm", "stride_xsk", "stride_wse", "stride_wsn", "stride_wsk")})
    if variant == "ws":
        sig["num_tiles"] = "i32"
    consts = {"STAGES": 4, "num_warps": 8 if variant == "plain" else 4}
    if variant == "ws":
        consts["PAIRS_API"] = kernels["pairs_api"]
    sig.update({k: "constexpr" for k in consts})
    compiled = triton.compile(GluonASTSource(kernels[variant], sig, consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": consts["num_warps"]})
    ptx = compiled.asm["ptx"]
    assert compiled.asm.get("cubin"), "ptxas produced no machine code"
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3", ptx)
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA loads
    if variant == "ws":
        assert "setmaxnreg" in ptx


def test_grouped_fp8_falls_back_to_the_triton_kernel_and_says_why(monkeypatch):
    """If the Gluon kernel cannot be built (another Triton's API), grouped_fp8 warns once and
    runs the Triton kernel from then on; results come from the fallback."""
    layout, xq, xs, wq, ws = _fp8_operands([130, 5, 0, 300], 256, 256, seed=3)
    calls = {"gluon": 0, "triton": 0}

    def broken(*args, **kwargs):
        calls["gluon"] += 1
        raise AttributeError("module 'tma' has no attribute 'async_load'")

    def triton_path(xq, xs, wq, ws, offsets, out_dtype):
        calls["triton"] += 1
        return K.grouped_gemm_fp8_reference(xq, xs, wq, ws, offsets, out_dtype)

    monkeypatch.setattr(grouped, "_on_gpu", lambda *t: True)
    monkeypatch.setattr(grouped, "_wgmma_applies", lambda xq, wq: grouped.WGMMA_DISABLED_BECAUSE is None)
    monkeypatch.setattr(gw, "grouped_gemm_fp8_wgmma", broken)
    monkeypatch.setattr(grouped, "grouped_gemm_fp8", triton_path)
    monkeypatch.setattr(grouped, "WGMMA_DISABLED_BECAUSE", None)
    with pytest.warns(RuntimeWarning, match="Gluon grouped FP8 kernel is unavailable.*async_load"):
        out = grouped.grouped_fp8(xq, xs, wq, ws, layout.offsets, torch.float32)
    again = grouped.grouped_fp8(xq, xs, wq, ws, layout.offsets, torch.float32)
    assert calls == {"gluon": 1, "triton": 2}
    assert "async_load" in grouped.WGMMA_DISABLED_BECAUSE
    ref = K.grouped_gemm_fp8_reference(xq, xs, wq, ws, layout.offsets, torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
