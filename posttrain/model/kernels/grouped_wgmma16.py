"""Grouped bf16 GEMM for Hopper in Gluon: the MoE layer's forward and input-gradient GEMMs.

C[rows of e] = A[rows of e] @ B_e for rows sorted by expert (`offsets` the cumulative row
ends, no alignment asked of them), with B_e given either as W[e] [N, K] read transposed (the
forward, y = x W_e^T) or as W[e] [K_c, N] read as it is (the input gradient, dx = dy W_e).

The schedule is the FP8 kernel's (grouped_wgmma.py): persistent programs, one per SM, each
with a TMA loader warp and two MMA warpgroups owning the upper and lower 64 rows of a
128 x BLOCK_N tile. Without per-block promotion each warpgroup keeps one wgmma in flight and
releases a shared-memory stage as soon as the MMA that read it has retired.

Rows need not be padded: an expert's rows are cut into 128-row tiles starting at its own
first row, so the last tile of an expert may run into the next expert's rows. Those rows are
loaded and multiplied (as a padded layout would waste them too) but never stored: a full tile
leaves by TMA, a partial one by a store masked to the expert's rows. The tile table (first
row, last row, expert of every tile) is built on the device from `offsets`, so nothing syncs.

Gluon has no interpreter: CPU tests check the host-side table and preconditions; the device
benchmark (benchmarks/bench_grouped_bf16.py) checks the numbers against torch._grouped_mm.
"""

from __future__ import annotations

import torch

BLOCK_M = 128
BLOCK_K = 64  # 128 bytes of bf16: one swizzled TMA row

_KERNELS: dict | None = None


def tile_table(offsets: torch.Tensor, M: int, block_m: int = BLOCK_M) -> torch.Tensor:
    """int32 [3, ceil(M / block_m) + E]: per tile its first row, the end of its expert's rows and
    its expert. Experts' rows are cut into block_m-row tiles from their own first row; tiles
    past the last one are empty (first row == end == 0). The count is a static bound, so the
    table is built with no host sync."""
    E = offsets.numel()
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles_e = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles_e, 0)
    t = torch.arange(-(-M // block_m) + E, device=offsets.device)
    e = torch.searchsorted(cum, t, right=True)
    live = e < E
    ec = e.clamp(max=E - 1)
    row0 = (ends[ec] - counts[ec]) + (t - (cum[ec] - tiles_e[ec])) * block_m
    zero = torch.zeros_like(row0)
    return torch.stack([torch.where(live, row0, zero), torch.where(live, ends[ec], zero), ec]).to(torch.int32)


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

    globals()["_tma_load"] = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    globals()["_tma_store"] = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    globals().update(gl=gl, mbarrier=mbarrier, tma=tma, warpgroup_mma=warpgroup_mma,
                     warpgroup_mma_wait=warpgroup_mma_wait, fence_async_shared=fence_async_shared)
    pairs_api = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters

    @gluon.jit
    def _tile(t, table_ptr, n_tiles_m, tiles_n, BN: gl.constexpr):
        m = t // tiles_n
        row0 = gl.load(table_ptr + m)
        end = gl.load(table_ptr + n_tiles_m + m)
        ex = gl.load(table_ptr + 2 * n_tiles_m + m)
        return row0, end, ex, (t % tiles_n) * BN

    @gluon.jit
    def _loader(a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
                M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        # W read transposed (K-major tiles [BN, BK]) or as it is ([BK, BN]); warp_specialize
        # passes its arguments as values, so the order is read off the descriptor's block
        B_KMAJOR: gl.constexpr = b_desc.block_type.shape[1] == BK
        STAGES: gl.constexpr = a_bufs.shape[0]
        nbytes: gl.constexpr = (BM + BN) * BK * 2
        it = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            row0, end, ex, col0 = _tile(t, table_ptr, n_tiles_m, tiles_n, BN)
            n_kb = gl.where(end > row0, gl.cdiv(K, BK), 0)
            for kb in range(n_kb):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [row0, kb * BK], ready.index(s), a_bufs.index(s))
                if B_KMAJOR:  # W [E * N, K]: the tile's N rows of expert ex
                    _tma_load(b_desc, [ex * N + col0, kb * BK], ready.index(s), b_bufs.index(s))
                else:  # W [E * K, N]: the K block's rows of expert ex
                    _tma_load(b_desc, [ex * K + kb * BK, col0], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _mma(HALF: gl.constexpr, a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty,
             turn, table_ptr, M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        # W read transposed (K-major tiles [BN, BK]) or as it is ([BK, BN]); warp_specialize
        # passes its arguments as values, so the order is read off the descriptor's block
        B_KMAJOR: gl.constexpr = b_desc.block_type.shape[1] == BK
        # Cooperative (c block [BM/2, BN]): both warpgroups on every tile, a half each.
        # Ping-pong (c block [BM, BN]): each warpgroup takes every other tile whole, so one
        # stores its tile while the other's MMAs run.
        PING: gl.constexpr = c_desc.block_type.shape[0] == BM
        RM: gl.constexpr = c_desc.block_type.shape[0]  # rows this warpgroup owns in a tile it works on
        STAGES: gl.constexpr = a_bufs.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 16])
        c_smem = c_bufs.index(HALF)
        it = 0
        j = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            row0, end, ex, col0 = _tile(t, table_ptr, n_tiles_m, tiles_n, BN)
            n_kb = gl.where(end > row0, gl.cdiv(K, BK), 0)
            if PING:
                mine = (j % 2) == HALF
            else:
                mine = j >= 0
            if mine:
                if PING:
                    # Ping-pong takes turns at the MMAs: this warpgroup's n-th tile waits until
                    # the other has issued all of its previous tile's. Without it, a warpgroup
                    # that skipped the other's tile could wait on a stage a whole ring ahead of
                    # the loader, where the barrier's phase parity cannot tell the rounds apart.
                    n = j // 2
                    mbarrier.wait(turn.index(HALF), (n & 1) ^ (1 - HALF))
                acc = gl.zeros([RM, BN], gl.float32, mma)
                prev = it % STAGES
                for kb in range(n_kb):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    if B_KMAJOR:
                        b = b_bufs.index(s).permute((1, 0))
                    else:
                        b = b_bufs.index(s)
                    if PING:
                        a = a_bufs.index(s)
                    else:
                        a = a_bufs.index(s).slice(HALF * RM, RM)
                    acc = warpgroup_mma(a, b, acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    if kb > 0:  # the MMA before this one has retired: its stage may be refilled
                        mbarrier.arrive(empty.index(prev), count=1)
                    prev = s
                    it += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                if PING:
                    mbarrier.arrive(turn.index(1 - HALF), count=1)
                if n_kb > 0:
                    mbarrier.arrive(empty.index(prev), count=1)
                    if PING:
                        first = row0
                    else:
                        first = row0 + HALF * RM
                    if first + RM <= end:
                        tma.store_wait(0)  # the previous tile's store has left c_smem
                        c_smem.store(acc.to(c_desc.dtype))
                        fence_async_shared()
                        _tma_store(c_desc, [first, col0], c_smem)
                    else:  # the next expert's rows follow: store this expert's only
                        rows = first + gl.arange(0, RM, layout=gl.SliceLayout(1, mma))
                        cols = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
                        ptrs = c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
                        gl.store(ptrs, acc.to(c_desc.dtype), mask=(rows[:, None] < end) & (cols[None, :] < N))
            else:
                it += n_kb  # the other warpgroup's tile: its stages pass by
            j += 1
        tma.store_wait(0)

    @gluon.jit
    def _mma_lo(a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
                M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm):
        _mma(0, a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
             M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm)

    @gluon.jit
    def _mma_hi(a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
                M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm):
        _mma(1, a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
             M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm)

    @gluon.jit
    def ws16_kernel(a_desc, b_desc, c_desc, c_ptr, table_ptr, M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm,
                    STAGES: gl.constexpr, PAIRS_API: gl.constexpr,
                    num_warps: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        # W read transposed (K-major tiles [BN, BK]) or as it is ([BK, BN]); warp_specialize
        # passes its arguments as values, so the order is read off the descriptor's block
        B_KMAJOR: gl.constexpr = b_desc.block_type.shape[1] == BK
        gl.static_assert(num_warps == 4, "the default partition is one MMA warpgroup")
        gl.static_assert(BN != BK, "the operand order is told by the B block's shape")
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        if B_KMAJOR:
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        else:
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
        RM: gl.constexpr = c_desc.block_type.shape[0]
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, RM, BN], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            # released by each MMA warpgroup (cooperative) or by the one whose tile it holds
            mbarrier.init(empty.index(i), count=1 if RM == BM else 2)
        args = (a_desc, b_desc, c_desc, c_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, table_ptr,
                M, N, K, n_tiles_m, tiles_n, num_tiles, stride_cm)
        if PAIRS_API:
            gl.warp_specialize([(_mma_lo, args), (_mma_hi, args), (_loader, args)], [4, 1], [232, 40])
        else:
            gl.warp_specialize(args, _mma_lo, args, [_mma_hi, _loader], [4, 1], [232, 40])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(turn.index(i))

    for name, fn in dict(_tile=_tile, _loader=_loader, _mma=_mma, _mma_lo=_mma_lo, _mma_hi=_mma_hi).items():
        globals()[name] = fn
    _KERNELS = dict(ws16=ws16_kernel, pairs_api=pairs_api)
    return _KERNELS


def check_operands(x: torch.Tensor, w: torch.Tensor, k_major: bool, block_k: int = BLOCK_K) -> tuple[int, int, int]:
    """(M, N, K) of C [M, N] = x [M, K] @ W_e (W [E, N, K] read transposed when k_major, else
    W [E, K, N]); raises what TMA and this kernel's tiling cannot take."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"the bf16 grouped GEMM takes bf16 operands, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected x [M, K] and w [E, *, *], got {tuple(x.shape)} and {tuple(w.shape)}")
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("the operands are read by TMA: x and w must be contiguous")
    M, K = x.shape
    N = w.shape[1] if k_major else w.shape[2]
    kw = w.shape[2] if k_major else w.shape[1]
    if kw != K:
        raise ValueError(f"x has K={K} but the weight's contraction dimension is {kw}")
    if K % block_k or N % 8:
        # W's K blocks of one expert must not reach into the next expert's (k_major=False
        # reads W [E * K, N] by rows), and TMA rows need 16-byte alignment
        raise ValueError(f"needs K % {block_k} == 0 and N % 8 == 0, got K={K}, N={N}")
    return M, N, K


def grouped_gemm_bf16_wgmma(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, k_major: bool = True,
                            block_n: int = 128, stages: int = 5, table: torch.Tensor | None = None,
                            pingpong: bool = False) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ (w[e].T if k_major else w[e]) on a Hopper GPU, bf16.

    offsets: int32 [E] cumulative row ends (any counts, zero included). Rows past offsets[-1]
    are not written. table: `tile_table(offsets, M)` when the caller reuses one.
    """
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, N, K = check_operands(x, w, k_major)
    E = w.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    if M == 0 or N == 0:
        return out
    if table is None:
        table = tile_table(offsets, M)
    n_tiles_m = table.shape[1]
    bf16 = gl.bfloat16
    a_desc = TensorDescriptor(x, [M, K], [K, 1], [BLOCK_M, BLOCK_K],
                              gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], bf16))
    if k_major:
        b_desc = TensorDescriptor(w.view(E * N, K), [E * N, K], [K, 1], [block_n, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], bf16))
    else:
        b_desc = TensorDescriptor(w.view(E * K, N), [E * K, N], [N, 1], [BLOCK_K, block_n],
                                  gl.NVMMASharedLayout.get_default_for([BLOCK_K, block_n], bf16))
    rows = BLOCK_M if pingpong else BLOCK_M // 2  # what one warpgroup stores of a tile
    c_desc = TensorDescriptor(out, [M, N], [N, 1], [rows, block_n],
                              gl.NVMMASharedLayout.get_default_for([rows, block_n], bf16))
    tiles_n = triton.cdiv(N, block_n)
    num_tiles = n_tiles_m * tiles_n
    kernels = _build()
    from .grouped_wgmma import _sm_count
    programs = min(num_tiles, _sm_count(x.device))
    kernels["ws16"][(programs,)](a_desc, b_desc, c_desc, out, table, M, N, K, n_tiles_m, tiles_n, num_tiles,
                                 out.stride(0), STAGES=stages,
                                 PAIRS_API=kernels["pairs_api"], num_warps=4)
    return out
