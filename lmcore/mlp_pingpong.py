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
Epilogues go out by (BM, BN / 2) half tiles (or quarter tiles) through shared memory and TMA stores.

`launch(a, b, pre, out, slope, backward, tile, b_kn, signs, zero)`: C = a (M, K) @ b (N, K)^T, or with `b_kn`
C = a @ b (K, N) (B's (BK, BN) tiles go to wgmma as they are, N-major: the backward takes w_proj
as stored, with no transposed copy a call); bf16 or fp16, contiguous, K a multiple of BK; forward
writes pre = C and out = act(C); backward reads pre and writes out = C * act'(pre). With `signs`
(train.fused_mlp_sign, mlp_kernel's `sign`): the forward writes pre's signs, 32 to an int32 word,
instead of pre, and the backward takes act'(pre) from post (passed as pre) and the signs, as
mlp_kernel's TMA kernel does (the same words, the same math). With `zero` (train.mlp_zeroes_dq_accum): the
kernel also writes zeros over that fp32 buffer as a side job, a slice after each tile's epilogue, where the
stores run while the other consumer's GEMM keeps the tensor cores busy (lmcore.fa3_xsa: the buffer is FA3's
dQ accumulator for the next attention backward, which then skips its own zeroing). tile = (BM, BN, BK, stages,
registers a consumer thread, consumers: 2, or 1 for no ping-pong[, parts: 2, or 4 for the forward's epilogue by
(BM, BN / 4) quarter tiles, train.fused_mlp_quarter_tiles]). Needs Triton's Gluon (3.6) and
an sm_90 GPU; lmcore.mlp_kernel decides when it runs. Measured: benchmarks/mlp_pingpong_bench.py;
benchmarks/RESULTS.md, session 23 (the sign path: session 33, no faster: its forward as fast as
without it, its backward 0.056 ms a call slower; the zeros: session 34, +0.037 ms a backward call, about
what a pass of their own costs; launch's probes, session 34: the forward without its TMA stores runs at
cuBLAS's GEMM-alone time, so its 0.09 ms a call over cuBLAS is those stores; the quarter tiles, session 35:
0.03 ms a forward call faster in the bench, 0.006 ms run back to back at the card's power cap
(benchmarks/energy_bench.py), no faster a training step).
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
# The forward by quarter tiles (the 7th field, PARTS): its epilogue's two buffers a consumer take half the shared
# memory, and the ring a sixth stage. The same GEMM order, the same bits (the bench's checks). Session 35, ms a
# forward call on GPU-8b1977e5 / GPU-36627803: 0.291 / 0.295-0.315 against TILE's 0.329-0.346 / 0.321-0.339; at 5
# stages 0.313-0.319 on the second. The backward by quarter tiles (pre's last two loaded in the epilogue) was
# slower, 0.371-0.376 against 0.320-0.332; B kept in shared memory (the ring A's alone) slower both ways.
TILE_QUARTER = (128, 128, 64, 6, 232, 2, 4)
# Registers a thread at launch: 3 warpgroups (the default consumer, the other consumer, the loader's
# warp rounded up to a group) x 128 threads x 168 fit the SM's 65,536; then the loader gives back to 24
# and the consumers take REGS and what remains.
MAXNREG = 168


if gluon is not None:

    @gluon.jit
    def _loader(a_desc, b_desc, pre_desc, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty,
                M, N, K, BACKWARD: gl.constexpr, SMS: gl.constexpr, CONSUMERS: gl.constexpr, B_KN: gl.constexpr):
        # one warp: the k-slices of A and B of every tile of this program, in tile order, into the
        # ring of stages; for the backward, after a tile's slices, pre's tile into its consumer's buffer
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1] if B_KN else b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        grid_n = gl.cdiv(N, BN)
        kt = gl.cdiv(K, BK)
        pos = 0
        j = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BM) * grid_n, SMS):
            om = (tile // grid_n) * BM
            on = (tile % grid_n) * BN
            for ki in range(kt):
                s = pos % STAGES
                mbarrier.wait(empty.index(s), ((pos // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [om, ki * BK], bar, a_bufs.index(s))
                if B_KN:
                    tma.async_copy_global_to_shared(b_desc, [ki * BK, on], bar, b_bufs.index(s))
                else:
                    tma.async_copy_global_to_shared(b_desc, [on, ki * BK], bar, b_bufs.index(s))
                pos += 1
            if BACKWARD:  # pre's two half tiles
                c = j % CONSUMERS
                bar = pre_ready.index(c)
                mbarrier.wait(pre_empty.index(c), ((j // CONSUMERS) & 1) ^ 1)
                mbarrier.expect(bar, 2 * pre_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(pre_desc, [om, on], bar, pre_bufs.index(2 * c))
                tma.async_copy_global_to_shared(pre_desc, [om, on + BN // 2], bar, pre_bufs.index(2 * c + 1))
            j += 1

    @gluon.jit
    def _consume(WHICH: gl.constexpr, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn,
                 pre_desc, out_desc, sign_ptr, pre_ptr, out_ptr, zero_ptr, zero_n, M, N, K, slope,
                 BACKWARD: gl.constexpr, SIGN: gl.constexpr, ZERO: gl.constexpr, SMS: gl.constexpr,
                 CONSUMERS: gl.constexpr, B_KN: gl.constexpr, PROBE: gl.constexpr, PARTS: gl.constexpr):
        # one warpgroup: the program's tiles WHICH, WHICH + CONSUMERS, ...: the GEMM from the ring's
        # stages (one wgmma in flight; a stage goes back to the loader once the wgmma after it is
        # issued), then the epilogue through its two buffers (pre_bufs[2 WHICH], [2 WHICH + 1]: half tiles, or
        # quarter tiles with PARTS 4) and TMA stores. WHICH 1 with one consumer: no tiles
        BM: gl.constexpr = a_bufs.type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        BN: gl.constexpr = PARTS * pre_bufs.type.shape[2]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
        grid_n = gl.cdiv(N, BN)
        kt = gl.cdiv(K, BK)
        tiles = gl.cdiv(M, BM) * grid_n if WHICH < CONSUMERS else 0
        j = WHICH
        for tile in range(gl.program_id(0) + WHICH * SMS, tiles, CONSUMERS * SMS):
            om = (tile // grid_n) * BM
            on = (tile % grid_n) * BN
            acc = gl.zeros([BM, BN], gl.float32, layout)
            pos = j * kt
            if CONSUMERS == 2:  # the GEMMs take turns (the module's docstring says why)
                mbarrier.wait(turn.index(WHICH), ((j // 2) & 1) ^ (1 - WHICH))
            for ki in range(kt):
                s = (pos + ki) % STAGES
                mbarrier.wait(ready.index(s), ((pos + ki) // STAGES) & 1)
                if B_KN:  # a (BK, BN) tile
                    acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
                else:  # a (BN, BK) tile, seen as (BK, BN)
                    acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
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
            if PROBE == 2:  # benches only (launch's probe): no epilogue, the accumulator summed to one value a tile
                gl.store(sign_ptr + tile, gl.sum(gl.sum(acc, axis=1), axis=0).to(sign_ptr.dtype.element_ty))
            else:
                _epilogue(acc, WHICH, pre_bufs, pre_ready, pre_desc, out_desc, sign_ptr, pre_ptr, out_ptr, om, on, M,
                          N, j, slope, BACKWARD, SIGN, CONSUMERS, PROBE, PARTS)
            if ZERO:  # this tile's slice of the buffer to zero, while the other consumer's GEMM runs
                _zero_slice(zero_ptr, zero_n, tile, gl.cdiv(M, BM) * grid_n)
            j += CONSUMERS
        tma.store_wait(0)

    @gluon.jit
    def _epilogue(acc, WHICH: gl.constexpr, pre_bufs, pre_ready, pre_desc, out_desc, sign_ptr, pre_ptr, out_ptr, om,
                  on, M, N, j, slope, BACKWARD: gl.constexpr, SIGN: gl.constexpr, CONSUMERS: gl.constexpr,
                  PROBE: gl.constexpr, PARTS: gl.constexpr):
        # a consumer's (BM, BN) tile from its accumulator: rounded as cuBLAS would, then by (BM, BN / 2) half tiles
        # through its two half-tile buffers (PARTS 4, the forward without signs: by (BM, BN / 4) quarter tiles
        # through two quarter-tile buffers, half the shared memory: room for a stage more). launch's probes (the
        # plain forward): 1 leaves out the TMA stores, 3 stores pre and post from registers (pre_ptr, out_ptr)
        # instead of through the buffers
        BM: gl.constexpr = acc.shape[0]
        BN: gl.constexpr = acc.shape[1]
        h = acc.to(out_desc.dtype).to(gl.float32)  # the GEMM's output as cuBLAS would round it
        left, right = h.reshape([BM, 2, BN // 2]).permute(0, 2, 1).split()  # two (BM, BN / 2) halves
        if BACKWARD:  # h is dpost: dpre = dpost * act'(pre), written over pre's (SIGN: post's) half tiles
            mbarrier.wait(pre_ready.index(WHICH), (j // CONSUMERS) & 1)
            _dpre_half(left, pre_bufs.index(2 * WHICH), out_desc, sign_ptr, om, on, M, N, slope, SIGN)
            _dpre_half(right, pre_bufs.index(2 * WHICH + 1), out_desc, sign_ptr, om, on + BN // 2, M, N, slope, SIGN)
        elif SIGN:  # h is pre: its signs, and post through a half-tile buffer each (free: the stores were waited)
            _store_signs(left, sign_ptr, om, on, M, N)
            _post_half(left, pre_bufs.index(2 * WHICH), out_desc, om, on, slope)
            _store_signs(right, sign_ptr, om, on + BN // 2, M, N)
            _post_half(right, pre_bufs.index(2 * WHICH + 1), out_desc, om, on + BN // 2, slope)
        elif PROBE == 3:
            _global_half(left, pre_ptr, out_ptr, om, on, M, N, slope)
            _global_half(right, pre_ptr, out_ptr, om, on + BN // 2, M, N, slope)
        elif PARTS == 4:  # h is pre: pre and post by quarter tiles, through two quarter-tile buffers
            q0, q1 = left.reshape([BM, 2, BN // 4]).permute(0, 2, 1).split()
            q2, q3 = right.reshape([BM, 2, BN // 4]).permute(0, 2, 1).split()
            pre_buf, post_buf = pre_bufs.index(2 * WHICH), pre_bufs.index(2 * WHICH + 1)
            _store_half(q0, pre_buf, post_buf, pre_desc, out_desc, om, on, slope, False, PROBE == 0)
            _store_half(q1, pre_buf, post_buf, pre_desc, out_desc, om, on + BN // 4, slope, True, PROBE == 0)
            _store_half(q2, pre_buf, post_buf, pre_desc, out_desc, om, on + BN // 2, slope, True, PROBE == 0)
            _store_half(q3, pre_buf, post_buf, pre_desc, out_desc, om, on + 3 * BN // 4, slope, True, PROBE == 0)
        else:  # h is pre: pre and post = leaky(pre)^2 by half tiles, through two half-tile buffers
            _store_half(left, pre_bufs.index(2 * WHICH), pre_bufs.index(2 * WHICH + 1), pre_desc, out_desc,
                        om, on, slope, False, PROBE == 0)
            _store_half(right, pre_bufs.index(2 * WHICH), pre_bufs.index(2 * WHICH + 1), pre_desc, out_desc,
                        om, on + BN // 2, slope, True, PROBE == 0)

    @gluon.jit
    def _global_half(h, pre_ptr, out_ptr, om, on, M, N, slope):
        # launch's probe 3: pre's and post's (BM, BN / 2) half tiles stored from the registers, in the
        # accumulator's layout (no shared memory, no TMA)
        rows, live, cols = _sign_rows_cols(h, om, M)
        offs = gl.expand_dims(rows, 1) * N + gl.expand_dims(on + cols, 0)
        mask = gl.expand_dims(live, 1) & gl.expand_dims(on + cols < N, 0)
        gl.store(pre_ptr + offs, h.to(pre_ptr.dtype.element_ty), mask=mask)
        lk = gl.where(h > 0, h, h * slope)
        gl.store(out_ptr + offs, (lk * lk).to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _zero_slice(zero_ptr, zero_n, tile, tiles):
        # zeros over tile's slice of zero_ptr's zero_n floats: slices of one length, a multiple of ZB, in tile order
        ZB: gl.constexpr = 2048  # 16 floats a thread of the warpgroup, as four 16-byte stores
        layout: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
        chunk = gl.cdiv(gl.cdiv(zero_n, tiles), ZB) * ZB
        offs = gl.arange(0, ZB, layout=layout)
        zeros = gl.zeros([ZB], gl.float32, layout)
        for start in range(tile * chunk, tile * chunk + chunk, ZB):
            gl.store(zero_ptr + start + offs, zeros, mask=start + offs < zero_n)

    @gluon.jit
    def _dpre_half(h, buf, out_desc, sign_ptr, om, on, M, N, slope, SIGN: gl.constexpr):
        # dpre = dpost * act'(pre) on a (BM, BN / 2) half tile: pre from its buffer, dpre over it. SIGN: the
        # buffer holds post, and act'(pre) = 2 sqrt(post) (1 where pre > 0, else slope, which is -|slope| here)
        dtype: gl.constexpr = out_desc.dtype
        p = buf.load(h.type.layout).to(gl.float32)
        if SIGN:
            grad = 2.0 * gl.sqrt(p) * gl.where(_load_signs(h, sign_ptr, om, on, M, N), 1.0, slope)
        else:
            grad = 2.0 * gl.where(p > 0, p, p * slope) * gl.where(p > 0, 1.0, slope)
        buf.store((h * grad).to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [om, on], buf)

    @gluon.jit
    def _sign_rows_cols(h, om, M):
        # a (BM, BH) half tile's rows (global, and whether they exist) and columns (in it), in h's layout's slices
        rows = om + gl.arange(0, h.shape[0], layout=gl.SliceLayout(1, h.type.layout))
        return rows, rows < M, gl.arange(0, h.shape[1], layout=gl.SliceLayout(0, h.type.layout))

    @gluon.jit
    def _store_signs(h, sign_ptr, om, on, M, N):
        # pre > 0 of a (BM, BH) half tile at (om, on) as the (M, N // 32) int32 words of mlp_kernel._pack (bit j of
        # word i: column 32 i + j), BH // 32 words a row; each word a masked row sum of its 32 columns' bits
        rows, live, cols = _sign_rows_cols(h, om, M)
        bits = gl.where(h > 0, 1, 0) << gl.expand_dims(cols % 32, 0)
        for i in gl.static_range(h.shape[1] // 32):
            word = gl.sum(gl.where(gl.expand_dims(cols // 32 == i, 0), bits, 0), axis=1)
            gl.store(sign_ptr + rows * (N // 32) + (on // 32 + i), word, mask=live & (on // 32 + i < N // 32))

    @gluon.jit
    def _load_signs(h, sign_ptr, om, on, M, N):
        # _store_signs' inverse: pre > 0 of a (BM, BH) half tile at (om, on), in h's layout (out of bounds: false)
        rows, live, cols = _sign_rows_cols(h, om, M)
        bits = gl.full(h.shape, 0, gl.int32, h.type.layout)
        for i in gl.static_range(h.shape[1] // 32):
            word = gl.load(sign_ptr + rows * (N // 32) + (on // 32 + i), mask=live & (on // 32 + i < N // 32),
                           other=0)
            bits = gl.where(gl.expand_dims(cols // 32 == i, 0), gl.expand_dims(word, 1), bits)
        return ((bits >> gl.expand_dims(cols % 32, 0)) & 1) != 0

    @gluon.jit
    def _post_half(h, buf, out_desc, om, on, slope):
        # post = leaky(h)^2 of a (BM, BN / 2) half tile through its buffer and a TMA store (SIGN's forward)
        lk = gl.where(h > 0, h, h * slope)
        buf.store((lk * lk).to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [om, on], buf)

    @gluon.jit
    def _store_half(h, pre_buf, post_buf, pre_desc, out_desc, om, on, slope, WAIT: gl.constexpr, STORE: gl.constexpr):
        # pre's and post's (BM, BN / 2) half tiles through their buffers; WAIT: each buffer's last
        # store may still be reading it (one store stays in flight while the next is staged). STORE false: no
        # TMA store (launch's probe 1), the buffers written all the same
        dtype: gl.constexpr = out_desc.dtype
        if WAIT:
            tma.store_wait(1)
        pre_buf.store(h.to(dtype))
        fence_async_shared()
        if STORE:
            tma.async_copy_shared_to_global(pre_desc, [om, on], pre_buf)
        lk = gl.where(h > 0, h, h * slope)
        post = (lk * lk).to(dtype)
        if WAIT:
            tma.store_wait(1)
        post_buf.store(post)
        fence_async_shared()
        if STORE:
            tma.async_copy_shared_to_global(out_desc, [om, on], post_buf)

    @gluon.jit
    def _pingpong_kernel(a_desc, b_desc, pre_desc, out_desc, sign_ptr, pre_ptr, out_ptr, zero_ptr, zero_n, M, N, K,
                         slope, BACKWARD: gl.constexpr, SIGN: gl.constexpr, ZERO: gl.constexpr, STAGES: gl.constexpr,
                         SMS: gl.constexpr, REGS: gl.constexpr, CONSUMERS: gl.constexpr, B_KN: gl.constexpr,
                         PROBE: gl.constexpr, PARTS: gl.constexpr):
        # B_KN: b_desc's tiles are (BK, BN) of a (K, N) B, else (BN, BK) of an (N, K) one. SIGN: pre's signs
        # at sign_ptr instead of pre (module docstring); pre_desc is then post's (backward) or unused (forward).
        # ZERO: zero_ptr's zero_n floats are zeroed, a slice a tile (_zero_slice). PARTS: the epilogue's pieces
        # (pre_desc's blocks are (BM, BN / PARTS))
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = PARTS * pre_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES, b_desc.block_type.shape[0], b_desc.block_type.shape[1]],
                                           b_desc.layout)
        # two (BM, BN / PARTS) tiles a consumer: forward, pre's and post's; backward, pre's, overwritten by dpre's
        pre_bufs = gl.allocate_shared_memory(dtype, [4, BM, BN // PARTS], pre_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        pre_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        pre_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
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
            (_consume, (0, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn, pre_desc, out_desc,
                        sign_ptr, pre_ptr, out_ptr, zero_ptr, zero_n, M, N, K, slope, BACKWARD, SIGN, ZERO, SMS,
                        CONSUMERS, B_KN, PROBE, PARTS)),
            (_consume, (1, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty, turn, pre_desc, out_desc,
                        sign_ptr, pre_ptr, out_ptr, zero_ptr, zero_n, M, N, K, slope, BACKWARD, SIGN, ZERO, SMS,
                        CONSUMERS, B_KN, PROBE, PARTS)),
            (_loader, (a_desc, b_desc, pre_desc, a_bufs, b_bufs, pre_bufs, ready, empty, pre_ready, pre_empty,
                       M, N, K, BACKWARD, SMS, CONSUMERS, B_KN)),
        ], [4, 1], [REGS, 24])


def _gl_dtype(t: Tensor):
    return gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16


def layouts(dtype, bm: int, bn: int, bk: int, b_kn: bool = False, parts: int = 2) -> list[tuple[list[int], object]]:
    """(block, NVMMA shared layout) of A's (bm, bk) tiles, B's (bn, bk) tiles (with b_kn: (bk, bn))
    and C's (bm, bn / parts) pieces (half tiles, or quarter tiles with parts 4)."""
    get = gl.NVMMASharedLayout.get_default_for
    return [(block, get(block, dtype)) for block in ([bm, bk], [bk, bn] if b_kn else [bn, bk], [bm, bn // parts])]


def descriptors(a: Tensor, b: Tensor, pre: Tensor, out: Tensor, bm: int, bn: int, bk: int,
                b_kn: bool = False, parts: int = 2) -> list:
    """Host-built TMA descriptors of A's and B's tiles and of pre's and out's pieces (layouts)."""
    la, lb, lc = layouts(_gl_dtype(a), bm, bn, bk, b_kn, parts)
    return [TensorDescriptor.from_tensor(t, *blk) for t, blk in ((a, la), (b, lb), (pre, lc), (out, lc))]


def launch(a: Tensor, b: Tensor, pre: Tensor, out: Tensor, slope: float, backward: bool, sms: int,
           tile: tuple = TILE, b_kn: bool = False, signs: Tensor | None = None, zero: Tensor | None = None,
           probe: int = 0) -> None:
    """One ping-pong kernel over C = a @ b^T, or a @ b with `b_kn` (module docstring), at `tile` (TILE's six
    fields, or TILE_QUARTER's seven: the forward without signs only), on `sms`
    persistent programs at most, with descriptors built on the host (kernel arguments: a CUDA
    graph keeps them). With `signs` ((M, N // 32) int32; N and BN / 2 multiples of 32): the forward
    writes them instead of pre (`pre` is not written: pass post), the backward reads them and post
    (passed as `pre`). `zero`: a contiguous fp32 tensor the kernel also fills with zeros. `probe` (benches only,
    the plain forward): 1 leaves out the epilogue's TMA stores (pre and post are not written), 2 the whole epilogue
    (each tile's accumulator is summed and the sum written over `out`'s first elements), 3 stores pre and post
    from the registers instead of through shared memory and TMA (pre and out contiguous), to time its parts."""
    bm, bn, bk, stages, regs, consumers, parts = (*tile, 2)[:7]  # 6 fields: by half tiles
    m, k = a.shape
    n = b.size(1) if b_kn else b.size(0)
    sign = signs is not None
    if parts not in (2, 4) or (parts == 4 and (backward or sign)):  # before the signs' own checks
        raise ValueError(f"tile {tile}: the epilogue by 2 pieces, or by 4 on the forward without signs")
    if sign and (n % 32 or bn % 64 or signs.shape != (m, n // 32) or signs.dtype != torch.int32
                 or not signs.is_contiguous()):
        raise ValueError(f"signs {tuple(signs.shape)} {signs.dtype} for a ({m}, {n}) output at BN {bn}: needs "
                         f"({m}, {n // 32}) int32 contiguous, N a multiple of 32 and BN of 64")
    if zero is not None and (zero.dtype != torch.float32 or not zero.is_contiguous() or zero.device != a.device):
        raise ValueError(f"zero: {zero.dtype} on {zero.device}, contiguous {zero.is_contiguous()}: needs a contiguous "
                         f"float32 tensor on {a.device}")
    if sign and backward:  # the factor of act' where pre <= 0: -|slope| sqrt(post) * 2 (mlp_kernel._launch's)
        slope = -abs(slope)
    grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    if probe and (backward or sign or probe not in (1, 2, 3)):
        raise ValueError(f"probe={probe}: 1, 2 or 3, on the forward without signs")
    z = zero is not None
    _pingpong_kernel[grid](*descriptors(a, b, pre, out, bm, bn, bk, b_kn, parts), signs if sign else out, pre, out,
                           zero if z else out, zero.numel() if z else 0, m, n, k, slope, BACKWARD=backward, SIGN=sign,
                           ZERO=z, STAGES=stages, SMS=grid[0], REGS=regs, CONSUMERS=consumers, B_KN=b_kn,
                           PROBE=probe, PARTS=parts, num_warps=4, maxnreg=MAXNREG)
