"""Grouped blockwise-FP8 GEMM for Hopper, written in Gluon (Triton's explicit-layout dialect).

Same contract as `grouped.grouped_gemm_fp8` (rows sorted by expert, `offsets` the cumulative
row ends, weights [E, N, K] with 128x128 block scales, activations with 1x128 scales), with one
extra condition: every expert's rows start on a multiple of 128, as in the padded layout the
MoE layer's FP8 path already uses. Then no 128-row tile straddles two experts, and operand
tiles are fetched by TMA without masks.

Why Gluon: every 128-wide K block needs its own float32 promotion,
acc += dot(a, b) * s_a * s_b. In plain Triton the whole CTA waits for the tensor cores before
each promotion and reloads its pipeline in lockstep, so MMA and promotion never overlap and
the kernel stays near bf16 speed (about 500 TFLOP/s on an H100). `ws` (the kernel used) is the
DeepGEMM schedule: persistent programs, one per SM, each with a TMA loader warp and two MMA
warpgroups that own the upper and lower 64 rows of the tile. Each warpgroup waits only for its
own wgmma, so one promotes while the other's MMA runs, and the loader fetches the next tile
while both store the last one (with K = 2048 a tile is only 16 blocks, so a CTA per tile paid
the pipeline fill and the epilogue each time). Tiles run N-fastest, so the programs resident
at once share one expert's weights and a few row tiles in L2. `plain` (one partition, a CTA
per tile) is kept as the baseline the benchmark measures it against.

Gluon has no interpreter: CPU tests check the host-side preconditions; the device benchmark
checks the numbers against the Triton kernel and a float64 reference.
"""

from __future__ import annotations

import torch

BLOCK_M = 128
BLOCK_N = 128  # = the weight's scale block: one weight scale per tile and K block
BLOCK_K = 128  # = the FP8 scale tile: one promotion per wgmma group

_KERNELS: dict | None = None


def _build() -> dict:
    """Define the kernels on first use (this module imports without Triton)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import inspect

    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)

    # Names that changed across Triton releases, resolved once and read by the kernels as
    # module globals: TMA copies (async_copy_global_to_shared became async_load) and the
    # warp_specialize call (per-partition (function, args) pairs replaced one shared tuple).
    globals()["_tma_load"] = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    globals()["_tma_store"] = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # The kernels are compiled from this module's globals (partition functions do not see
    # _build's locals), so the Gluon names go there too.
    globals().update(gl=gl, mbarrier=mbarrier, tma=tma, warpgroup_mma=warpgroup_mma,
                     warpgroup_mma_wait=warpgroup_mma_wait, fence_async_shared=fence_async_shared)
    ws_params = inspect.signature(gl.warp_specialize).parameters
    pairs_api = "functions_and_args" in ws_params

    @gluon.jit
    def _tile_of(t, tile_expert_ptr, E, K, tiles_n, BM: gl.constexpr, BK: gl.constexpr, BN: gl.constexpr):
        """(first row, first column, expert, K blocks) of output tile t (N-fastest order).
        tile_expert holds each 128-row tile's expert (E past the last expert: zeros)."""
        row0 = (t // tiles_n) * BM
        col0 = (t % tiles_n) * BN
        ex = gl.load(tile_expert_ptr + t // tiles_n)
        n_kb = gl.where(ex < E, gl.cdiv(K, BK), 0)
        return row0, col0, gl.minimum(ex, E - 1), n_kb

    @gluon.jit
    def plain_kernel(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, tile_expert_ptr, M, N, K, E, tiles_n,
                     stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk,
                     STAGES: gl.constexpr, num_warps: gl.constexpr):
        """One partition: TMA ring of STAGES blocks, MMA then promotion each block."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BN == 128, "one weight scale per tile: BN must equal the weight block")
        row0, col0, we, n_kb = _tile_of(gl.program_id(0), tile_expert_ptr, E, K, tiles_n, BM, BK, BN)
        brow = we * N + col0  # the weight is read as [E * N, K]

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BN, 32])
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        row_ok = rows < M
        xs_rows = xs_ptr + rows.to(gl.int64) * stride_xsm
        ws_tile = ws_ptr + we.to(gl.int64) * stride_wse + (col0 // BN) * stride_wsn

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = (BM + BN) * BK  # one byte per FP8 element
        for i in gl.static_range(STAGES - 1):
            if i < n_kb:
                mbarrier.expect(bars.index(i), nbytes)
                _tma_load(a_desc, [row0, i * BK], bars.index(i), a_bufs.index(i))
                _tma_load(b_desc, [brow, i * BK], bars.index(i), b_bufs.index(i))

        acc = gl.zeros([BM, BN], gl.float32, mma)
        zero = gl.zeros([BM, BN], gl.float32, mma)
        for kb in range(n_kb):
            nxt = kb + STAGES - 1  # refill the buffer block kb-1 used with block kb + STAGES - 1
            if nxt < n_kb:
                ps = nxt % STAGES
                mbarrier.expect(bars.index(ps), nbytes)
                _tma_load(a_desc, [row0, nxt * BK], bars.index(ps), a_bufs.index(ps))
                _tma_load(b_desc, [brow, nxt * BK], bars.index(ps), b_bufs.index(ps))
            sa = gl.load(xs_rows + kb * stride_xsk, mask=row_ok, other=0.0)
            sb = gl.load(ws_tile + kb * stride_wsk)
            s = kb % STAGES
            mbarrier.wait(bars.index(s), (kb // STAGES) & 1)
            cur = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), zero,
                                use_acc=False, is_async=True)
            cur = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))
            acc = acc + cur * (sa * sb)[:, None]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BM, BN], c_desc.layout)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [row0, col0], c_smem)
        tma.store_wait(0)

    # ---- persistent, warp-specialised: a TMA warp and two MMA warpgroups out of step -------
    #
    # Each program walks the output tiles pid, pid + P, pid + 2P, ... (P = the number of SMs),
    # so the loader warp fetches the next tile's first blocks while the MMA warpgroups finish
    # and store the current one: with K = 2048 a tile is only 16 blocks, and a fresh CTA per
    # tile paid the pipeline fill and the epilogue every time. The two MMA warpgroups own the
    # tile's upper and lower 64 rows and wait only for their own MMAs, so one promotes while
    # the other's MMA runs. The shared-memory ring (STAGES blocks, `ready`/`empty` barriers)
    # runs on across tiles with one running block counter on each side.

    @gluon.jit
    def _ws_loader(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                   M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                   stride_wsk):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.shape[0]
        nbytes: gl.constexpr = (BM + BN) * BK  # one byte per FP8 element
        it = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            row0, col0, we, n_kb = _tile_of(t, tile_expert_ptr, E, K, tiles_n, BM, BK, BN)
            brow = we * N + col0  # the weight is read as [E * N, K]
            for kb in range(n_kb):
                s = it % STAGES
                # Wait until both MMA warpgroups released this buffer (a fresh barrier passes
                # the parity-1 wait at once, so the first round does not block).
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [row0, kb * BK], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [brow, kb * BK], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _ws_mma(HALF: gl.constexpr, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty,
                xs_ptr, ws_ptr, tile_expert_ptr, M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk,
                stride_wse, stride_wsn, stride_wsk):
        """Rows HALF*64 .. HALF*64+63 of each tile."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        HM: gl.constexpr = BM // 2
        STAGES: gl.constexpr = a_bufs.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 32])
        zero = gl.zeros([HM, BN], gl.float32, mma)
        c_smem = c_bufs.index(HALF)
        it = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            row0, col0, we, n_kb = _tile_of(t, tile_expert_ptr, E, K, tiles_n, BM, BK, BN)
            rows = row0 + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma))
            row_ok = rows < M
            xs_rows = xs_ptr + rows.to(gl.int64) * stride_xsm
            ws_tile = ws_ptr + we.to(gl.int64) * stride_wse + (col0 // BN) * stride_wsn
            acc = gl.zeros([HM, BN], gl.float32, mma)
            for kb in range(n_kb):
                s = it % STAGES
                sa = gl.load(xs_rows + kb * stride_xsk, mask=row_ok, other=0.0)
                sb = gl.load(ws_tile + kb * stride_wsk)
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                cur = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM), b_bufs.index(s).permute((1, 0)),
                                    zero, use_acc=False, is_async=True)
                cur = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))
                mbarrier.arrive(empty.index(s), count=1)
                acc = acc + cur * (sa * sb)[:, None]  # promotion once per 128-wide K block
                it += 1
            tma.store_wait(0)  # the previous tile's store has left c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _tma_store(c_desc, [row0 + HALF * HM, col0], c_smem)
        tma.store_wait(0)

    # Two entry points rather than one taking HALF: the older warp_specialize hands every worker
    # partition the same argument tuple, so the half is fixed by which function runs.
    @gluon.jit
    def _ws_mma_lo(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                   M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                   stride_wsk):
        _ws_mma(0, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                stride_wsk)

    @gluon.jit
    def _ws_mma_hi(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                   M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                   stride_wsk):
        _ws_mma(1, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                stride_wsk)

    @gluon.jit
    def ws_kernel(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, tile_expert_ptr, M, N, K, E, tiles_n,
                  stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, num_tiles,
                  STAGES: gl.constexpr, PAIRS_API: gl.constexpr,
                  num_warps: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BN == 128, "one weight scale per tile: BN must equal the weight block")
        gl.static_assert(num_warps == 4, "the default partition is one MMA warpgroup")
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BM // 2, BN], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per MMA warpgroup
        args = (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, xs_ptr, ws_ptr, tile_expert_ptr,
                M, N, K, E, tiles_n, num_tiles, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                stride_wsk)
        if PAIRS_API:
            gl.warp_specialize([(_ws_mma_lo, args), (_ws_mma_hi, args), (_ws_loader, args)], [4, 1], [232, 40])
        else:
            gl.warp_specialize(args, _ws_mma_lo, args, [_ws_mma_hi, _ws_loader], [4, 1], [232, 40])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))

    for name, fn in dict(_tile_of=_tile_of, _ws_loader=_ws_loader, _ws_mma=_ws_mma, _ws_mma_lo=_ws_mma_lo,
                         _ws_mma_hi=_ws_mma_hi).items():
        globals()[name] = fn
    _KERNELS = dict(plain=plain_kernel, ws=ws_kernel, pairs_api=pairs_api)
    return _KERNELS


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def tile_experts(offsets: torch.Tensor, M: int) -> torch.Tensor:
    """int32 [ceil(M / 128)]: the expert of each 128-row tile (the number of expert row ends at
    or before its first row; E for tiles past the last expert). Found once per call on the
    device (no host sync) rather than by every partition of every program."""
    offsets = offsets.to(torch.int32).contiguous()
    tile_rows = torch.arange(0, M, BLOCK_M, device=offsets.device, dtype=torch.int32)
    return torch.searchsorted(offsets, tile_rows, right=True).to(torch.int32)


def check_wgmma_operands(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                         out_dtype: torch.dtype) -> None:
    """What TMA needs: row-major operands with 16-byte-aligned rows (K and N multiples of 16
    and 8), and an output dtype the epilogue writes."""
    if xq.dim() != 2 or wq.dim() != 3 or xq.shape[1] != wq.shape[2]:
        raise ValueError(f"expected xq [M, K] and wq [E, N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"xq and wq must be float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    M, K = xq.shape
    E, N, _ = wq.shape
    if not (xq.is_contiguous() and wq.is_contiguous()):
        raise ValueError("the wgmma grouped GEMM reads xq and wq by TMA: both must be contiguous "
                         "(pass the K-major transposed weight for the input gradient)")
    if K % 16 or N % 8:
        raise ValueError(f"TMA needs K % 16 == 0 and N % 8 == 0, got K={K}, N={N}")
    if out_dtype not in _GL_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(_GL_DTYPES)}, got {out_dtype}")
    KB, NB = -(-K // 128), -(-N // 128)
    if tuple(xs.shape) != (M, KB) or tuple(ws.shape) != (E, NB, KB):
        raise ValueError(f"scales must be xs [{M}, {KB}] and ws [{E}, {NB}, {KB}], "
                         f"got {tuple(xs.shape)} and {tuple(ws.shape)}")


def grouped_gemm_fp8_wgmma(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                           offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                           variant: str = "ws", stages: int = 4) -> torch.Tensor:
    """out[rows of e] = dequant(xq_e, xs_e) @ dequant(wq[e], ws[e]).T on a Hopper GPU.

    offsets: int32 [E] cumulative row ends, every one a multiple of 128 (unchecked: checking
    would cost a host sync; pad_offsets_to gives such offsets). Rows past offsets[-1] are 0.
    variant: "ws" (warp-specialised) or "plain" (one partition; the baseline it is measured
    against).
    """
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    check_wgmma_operands(xq, xs, wq, ws, out_dtype)
    M, K = xq.shape
    E, N, _ = wq.shape
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return out
    offs = offsets.to(torch.int32).contiguous()
    fp8 = gl.float8e4nv
    a_desc = TensorDescriptor(xq, [M, K], [K, 1], [BLOCK_M, BLOCK_K],
                              gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], fp8))
    b_desc = TensorDescriptor(wq.view(E * N, K), [E * N, K], [K, 1], [BLOCK_N, BLOCK_K],
                              gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], fp8))
    tiles_n = triton.cdiv(N, BLOCK_N)
    grid = (triton.cdiv(M, BLOCK_M) * tiles_n,)
    kernels = _build()
    tile_expert = tile_experts(offs, M)
    common = (tile_expert, M, N, K, E, tiles_n, xs.stride(0), xs.stride(1), ws.stride(0), ws.stride(1), ws.stride(2))
    c_gl = getattr(gl, _GL_DTYPES[out_dtype])
    if variant == "plain":
        c_desc = TensorDescriptor(out, [M, N], [N, 1], [BLOCK_M, BLOCK_N],
                                  gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], c_gl))
        kernels["plain"][grid](a_desc, b_desc, c_desc, xs, ws, *common,
                               STAGES=stages, num_warps=8)
    elif variant == "ws":
        half = BLOCK_M // 2  # each MMA warpgroup stores its own 64 rows
        c_desc = TensorDescriptor(out, [M, N], [N, 1], [half, BLOCK_N],
                                  gl.NVMMASharedLayout.get_default_for([half, BLOCK_N], c_gl))
        num_tiles = grid[0]
        programs = min(num_tiles, _sm_count(xq.device))
        kernels["ws"][(programs,)](a_desc, b_desc, c_desc, xs, ws, *common, num_tiles,
                                   STAGES=stages,
                                   PAIRS_API=kernels["pairs_api"], num_warps=4)
    else:
        raise ValueError(f"variant must be 'ws' or 'plain', got {variant!r}")
    return out
