"""train.fused_mlp's GEMMs as a warp-specialized ping-pong kernel (Gluon, Hopper; issue 16).

lmcore.mlp_kernel's persistent TMA kernel runs each tile's epilogue (pre and act(pre) forward,
dpost * act'(pre) backward) in the same warps as its GEMM, so the tensor cores wait while it
runs: 0.09-0.13 ms a call over cuBLAS's GEMM alone at `record`'s micro-batch (session 18).
This kernel splits a program into three partitions (`gl.warp_specialize`):
- a loader warp that issues every TMA load (A and B's k-slices into a ring of stages and, for
  the backward, pre's tile for its epilogue);
- two consumer warpgroups that take the program's tiles in turn (even and odd), each with its
  own (BM, BN) fp32 accumulator: while one runs its epilogue, the other runs its GEMM. Their
  GEMMs take turns (a pair of mbarriers): both wait on the one ring, and a consumer that ran
  ahead of the other's waits could pass a wait meant for a later phase of a stage.
The same math as mlp_kernel's kernels: the GEMM's fp32 result is rounded to the output dtype,
the activation (or its derivative) runs in fp32 on that value and is rounded once. Its outputs
equal the TMA kernel's bit for bit at the shapes tested (the same wgmma k-slice order).
Epilogues go out by (BM, BN / 2) half tiles through shared memory and TMA stores.

With `resident` (a tile's seventh field) B stays in shared memory: a program keeps one column
block's whole (BN, K) panel of B, loaded once, and takes that block's row tiles P apart (P programs
a column block, all of them working on neighbouring row tiles at once, so A's rows are read from
HBM once and from L2 by each column block). Only A's k-slices go through the ring. At K = 512 a
128 x 128 tile of the plain schedule reads 256 KB from L2 for 16.8 MFLOP, 64 FLOP a byte; with B
resident only A's slices, BN = 128 FLOP a byte, cuBLAS's ratio at its 256 x 128 tile with a
2-CTA cluster. Session 23's tiles behaved as if L2 bandwidth bound them (the 64 x 256 tile, 52
FLOP a byte, ran slower by about that ratio). Needs K // BK slices of (BN, BK) in shared memory.

`launch(a, b_nk, pre, out, slope, backward, tile)`: C = a (M, K) @ b_nk (N, K)^T, bf16 or fp16,
contiguous, K a multiple of BK; forward writes pre = C and out = act(C); backward reads pre and
writes out = C * act'(pre). tile = (BM, BN, BK, stages, registers a consumer thread, consumers:
2, or 1 for no ping-pong[, resident: 1 keeps B in shared memory]). Needs Triton's Gluon (3.6) and an sm_90 GPU; lmcore.mlp_kernel
decides when it runs. Measured: benchmarks/mlp_pingpong_bench.py; benchmarks/RESULTS.md, session 23.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton, or one without Gluon's Hopper ops: lmcore.mlp_kernel's kernels serve
    gluon = None

# BM, BN, BK, stages, registers a consumer thread, consumers. benchmarks/mlp_pingpong_bench.py on H200s
# (session 23), ms a call forward / backward at record's micro-batch: 5 stages 0.316-0.320 / 0.308-0.324; 4
# stages 0.336-0.372 / 0.326-0.330; 3 stages 0.412 / 0.383; BK 32 at 10 stages 0.367 / 0.355; one consumer
# (no ping-pong) at 4 stages 0.393 / 0.368; 240 registers 0.348 / 0.328. The TMA kernel: 0.359-0.364 / 0.417-0.418.
TILE = (128, 128, 64, 5, 232, 2)
# Registers a thread at launch: 3 warpgroups (the default consumer, the other consumer, the loader's
# warp rounded up to a group) x 128 threads x 168 fit the SM's 65,536; then the loader gives back to 24
# and the consumers take REGS and what remains.
MAXNREG = 168


if gluon is not None:

    @gluon.jit
    def _tiles(M, N, BM: gl.constexpr, BN: gl.constexpr, SMS: gl.constexpr, RESIDENT: gl.constexpr):
        # this program's tiles: how many, and the two numbers _corner turns its j-th tile's index into
        grid_n = gl.cdiv(N, BN)
        pid = gl.program_id(0)
        if RESIDENT:  # P = SMS // grid_n programs a column block; this one takes its row tiles r, r + P, ...
            per_n = SMS // grid_n
            first = pid % per_n
            count = gl.cdiv(gl.cdiv(M, BM) - first, per_n)
        else:  # tiles pid, pid + SMS, ... of the row-major order (a row of tiles at a time over all programs)
            first = pid
            count = gl.cdiv(gl.cdiv(M, BM) * grid_n - first, SMS)
        return count, first

    @gluon.jit
    def _corner(j, first, N, BM: gl.constexpr, BN: gl.constexpr, SMS: gl.constexpr, RESIDENT: gl.constexpr):
        # (row, column) where this program's j-th tile starts
        grid_n = gl.cdiv(N, BN)
        if RESIDENT:
            per_n = SMS // grid_n
            om = (first + j * per_n) * BM
            on = (gl.program_id(0) // per_n) * BN
        else:
            tile = first + j * SMS
            om = (tile // grid_n) * BM
            on = (tile % grid_n) * BN
        return om, on

    @gluon.jit
    def _loader(a_desc, b_desc, pre_desc, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, b_ready,
                M, N, K, BACKWARD: gl.constexpr, SMS: gl.constexpr, CONSUMERS: gl.constexpr, RESIDENT: gl.constexpr):
        # one warp: the k-slices of A and B of every tile of this program, in tile order, into the
        # ring of stages (RESIDENT: B's panel once, before them, and then A's slices alone); for the
        # backward, after a tile's slices, pre's tile into its consumer's buffer
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        kt = gl.cdiv(K, BK)
        count, first = _tiles(M, N, BM, BN, SMS, RESIDENT)
        if RESIDENT:  # b_bufs holds K // BK slices (the kernel's KT)
            KT: gl.constexpr = b_bufs.type.shape[0]
            _, on = _corner(0, first, N, BM, BN, SMS, RESIDENT)
            mbarrier.expect(b_ready.index(0), KT * b_desc.block_type.nbytes)
            for kb in gl.static_range(KT):
                tma.async_copy_global_to_shared(b_desc, [on, kb * BK], b_ready.index(0), b_bufs.index(kb))
        nbytes: gl.constexpr = a_desc.block_type.nbytes + (0 if RESIDENT else b_desc.block_type.nbytes)
        pos = 0
        for j in range(count):
            om, on = _corner(j, first, N, BM, BN, SMS, RESIDENT)
            for ki in range(kt):
                s = pos % STAGES
                mbarrier.wait(empty.index(s), ((pos // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(a_desc, [om, ki * BK], bar, a_bufs.index(s))
                if not RESIDENT:
                    tma.async_copy_global_to_shared(b_desc, [on, ki * BK], bar, b_bufs.index(s))
                pos += 1
            if BACKWARD:  # pre's two half tiles
                c = j % CONSUMERS
                bar = pre_ready.index(c)
                mbarrier.wait(pre_empty.index(c), ((j // CONSUMERS) & 1) ^ 1)
                mbarrier.expect(bar, 2 * pre_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(pre_desc, [om, on], bar, pre_bufs.index(2 * c))
                tma.async_copy_global_to_shared(pre_desc, [om, on + BN // 2], bar, pre_bufs.index(2 * c + 1))

    @gluon.jit
    def _consume(WHICH: gl.constexpr, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn, b_ready,
                 pre_desc, out_desc, M, N, K, slope, BACKWARD: gl.constexpr, SMS: gl.constexpr,
                 CONSUMERS: gl.constexpr, RESIDENT: gl.constexpr):
        # one warpgroup: the program's tiles WHICH, WHICH + CONSUMERS, ...: the GEMM from the ring's
        # stages (one wgmma in flight; a stage goes back to the loader once the wgmma after it is
        # issued), then the epilogue through its two half-tile buffers (pre_bufs[2 WHICH], [2 WHICH + 1])
        # and TMA stores. WHICH 1 with one consumer: no tiles
        BM: gl.constexpr = a_bufs.type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        BN: gl.constexpr = b_bufs.type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
        dtype: gl.constexpr = out_desc.dtype
        kt = gl.cdiv(K, BK)
        count, first = _tiles(M, N, BM, BN, SMS, RESIDENT)
        if WHICH >= CONSUMERS:
            count = 0
        if RESIDENT:  # B's panel, loaded once for all of this program's tiles
            mbarrier.wait(b_ready.index(0), 0)
        for j in range(WHICH, count, CONSUMERS):
            om, on = _corner(j, first, N, BM, BN, SMS, RESIDENT)
            acc = gl.zeros([BM, BN], gl.float32, layout)
            pos = j * kt
            if CONSUMERS == 2:  # the GEMMs take turns (the module's docstring says why)
                mbarrier.wait(turn.index(WHICH), ((j // 2) & 1) ^ (1 - WHICH))
            for ki in range(kt):
                s = (pos + ki) % STAGES
                mbarrier.wait(ready.index(s), ((pos + ki) // STAGES) & 1)
                if RESIDENT:
                    b = b_bufs.index(ki)
                else:
                    b = b_bufs.index(s)
                acc = warpgroup_mma(a_bufs.index(s), b.permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))
                if ki > 0:
                    mbarrier.arrive(empty.index((pos + ki - 1) % STAGES), count=1)
                else:  # the last tile's store has had the whole of this tile's first wgmma to finish
                    tma.store_wait(0)
                    if BACKWARD:
                        mbarrier.arrive(pre_empty.index(WHICH), count=1, pred=j >= CONSUMERS)
            if CONSUMERS == 2:
                mbarrier.arrive(turn.index(1 - WHICH), count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((pos + kt - 1) % STAGES), count=1)
            h = acc.to(dtype).to(gl.float32)  # the GEMM's output as cuBLAS would round it
            left, right = h.reshape([BM, 2, BN // 2]).permute(0, 2, 1).split()  # two (BM, BN / 2) halves
            if BACKWARD:  # h is dpost: dpre = dpost * act'(pre), written over pre's half tiles
                mbarrier.wait(pre_ready.index(WHICH), (j // CONSUMERS) & 1)
                _dpre_half(left, pre_bufs.index(2 * WHICH), out_desc, om, on, slope)
                _dpre_half(right, pre_bufs.index(2 * WHICH + 1), out_desc, om, on + BN // 2, slope)
            else:  # h is pre: pre and post = leaky(pre)^2 by half tiles, through two half-tile buffers
                _store_half(left, pre_bufs.index(2 * WHICH), pre_bufs.index(2 * WHICH + 1), pre_desc, out_desc,
                            om, on, slope, False)
                _store_half(right, pre_bufs.index(2 * WHICH), pre_bufs.index(2 * WHICH + 1), pre_desc, out_desc,
                            om, on + BN // 2, slope, True)
        tma.store_wait(0)

    @gluon.jit
    def _dpre_half(h, buf, out_desc, om, on, slope):
        # dpre = dpost * act'(pre) on a (BM, BN / 2) half tile: pre from its buffer, dpre over it
        dtype: gl.constexpr = out_desc.dtype
        p = buf.load(h.type.layout).to(gl.float32)
        grad = 2.0 * gl.where(p > 0, p, p * slope) * gl.where(p > 0, 1.0, slope)
        buf.store((h * grad).to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [om, on], buf)

    @gluon.jit
    def _store_half(h, pre_buf, post_buf, pre_desc, out_desc, om, on, slope, WAIT: gl.constexpr):
        # pre's and post's (BM, BN / 2) half tiles through their buffers; WAIT: each buffer's last
        # store may still be reading it (one store stays in flight while the next is staged)
        dtype: gl.constexpr = out_desc.dtype
        if WAIT:
            tma.store_wait(1)
        pre_buf.store(h.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(pre_desc, [om, on], pre_buf)
        lk = gl.where(h > 0, h, h * slope)
        post = (lk * lk).to(dtype)
        if WAIT:
            tma.store_wait(1)
        post_buf.store(post)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [om, on], post_buf)

    @gluon.jit
    def _pingpong_kernel(a_desc, b_desc, pre_desc, out_desc, M, N, K, slope, BACKWARD: gl.constexpr,
                         STAGES: gl.constexpr, SMS: gl.constexpr, REGS: gl.constexpr, CONSUMERS: gl.constexpr,
                         KT: gl.constexpr):
        # KT: B's slices kept in shared memory, K // BK (RESIDENT), or 0 (B through the ring with A)
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        RESIDENT: gl.constexpr = KT > 0
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [KT if RESIDENT else STAGES, BN, BK], b_desc.layout)
        # two (BM, BN / 2) half tiles a consumer: forward, pre's and post's; backward, pre's, overwritten by dpre's
        pre_bufs = gl.allocate_shared_memory(dtype, [4, BM, BN // 2], pre_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        pre_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        pre_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        b_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(b_ready.index(0), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(pre_ready.index(i), count=1)
            mbarrier.init(pre_empty.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        # each partition's arguments as a tuple written out here: a tuple kept in a variable would turn
        # the constexprs in it into runtime values (both branches of `if BACKWARD` compiled and taken at run time)
        gl.warp_specialize([
            (_consume, (0, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn, b_ready, pre_desc,
                        out_desc, M, N, K, slope, BACKWARD, SMS, CONSUMERS, RESIDENT)),
            (_consume, (1, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn, b_ready, pre_desc,
                        out_desc, M, N, K, slope, BACKWARD, SMS, CONSUMERS, RESIDENT)),
            (_loader, (a_desc, b_desc, pre_desc, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty,
                       b_ready, M, N, K, BACKWARD, SMS, CONSUMERS, RESIDENT)),
        ], [4, 1], [REGS, 24])


def _gl_dtype(t: Tensor):
    return gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16


def layouts(dtype, bm: int, bn: int, bk: int, cn: int) -> tuple:
    """The NVMMA shared layouts of A's (bm, bk), B's (bn, bk) and C's (bm, cn) tiles."""
    get = gl.NVMMASharedLayout.get_default_for
    return get([bm, bk], dtype), get([bn, bk], dtype), get([bm, cn], dtype)


def descriptors(a: Tensor, b_nk: Tensor, pre: Tensor, out: Tensor, bm: int, bn: int, bk: int) -> list:
    """Host-built TMA descriptors of A's (bm, bk) and B's (bn, bk) tiles and of pre's and out's
    (bm, bn / 2) half tiles."""
    cn = bn // 2
    la, lb, lc = layouts(_gl_dtype(a), bm, bn, bk, cn)
    return [TensorDescriptor.from_tensor(a, [bm, bk], la), TensorDescriptor.from_tensor(b_nk, [bn, bk], lb),
            TensorDescriptor.from_tensor(pre, [bm, cn], lc), TensorDescriptor.from_tensor(out, [bm, cn], lc)]


def grid_size(m: int, n: int, k: int, sms: int, tile: tuple) -> tuple[int, int]:
    """(programs, B's slices kept in shared memory: 0 unless the tile is resident) for an (m, n)
    output over k: with B resident, sms // column blocks programs a column block (at least one)."""
    bm, bn, bk = tile[:3]
    grid_n = -(-n // bn)
    if len(tile) > 6 and tile[6]:
        if k % bk:  # the consumers count k-slices from K; B's buffers hold K // BK of them
            raise ValueError(f"mlp_pingpong: B resident needs K ({k}) a multiple of BK ({bk})")
        return max(1, sms // grid_n) * grid_n, k // bk
    return min(sms, -(-m // bm) * grid_n), 0


def launch(a: Tensor, b_nk: Tensor, pre: Tensor, out: Tensor, slope: float, backward: bool, sms: int,
           tile: tuple = TILE) -> None:
    """One ping-pong kernel over C = a @ b_nk^T (module docstring), on `sms` persistent programs
    at most (with B resident: a multiple of the column blocks, at least one each), with
    descriptors built on the host (kernel arguments: a CUDA graph keeps them)."""
    bm, bn, bk, stages, regs, consumers = tile[:6]
    (m, k), n = a.shape, b_nk.size(0)
    programs, kt = grid_size(m, n, k, sms, tile)
    _pingpong_kernel[(programs,)](*descriptors(a, b_nk, pre, out, bm, bn, bk), m, n, k, slope, BACKWARD=backward,
                                  STAGES=stages, SMS=programs, REGS=regs, CONSUMERS=consumers, KT=kt,
                                  num_warps=4, maxnreg=MAXNREG)
