"""The input stage as one op (train.fused_embed): the token embedding, the product-key bigram, the RMS norm
and the SmearGate, forward and backward, with the embedding tables' gradients summed by token before they
are added.

`embed_smear(ids, prev, tok, ep, ec, scale, gate, bos_id)` is GPT.embed's plain path for model.bigram
product_key with model.smear_gate, in fp32 from the tables' values: per token t of a sequence,
  e_t = tok[i_t] + s ep[p_t] ec[i_t],   n_t = e_t rstd_t,   rstd_t = 1 / sqrt(mean(e_t^2) + eps),
  y_t = (1 - g) n_t + g k_t n_{t-1}     (g = sigmoid(gate), n_{-1} = 0, k_t = [i_t != bos_id] or 1),
with i the ids, p the previous ids (GPT's previous_ids), and y rounded to the tables' dtype once. The
backward, from dy: dn_t = (1 - g) dy_t + g k_{t+1} dy_{t+1}, de_t = rstd_t (dn_t - n_t mean(dn_t n_t)),
then tok's gradient at i_t gets de_t, ec's s de_t ep[p_t], ep's (at p_t) s de_t ec[i_t]; the scale's
gradient is the sum of de_t ep[p_t] ec[i_t], the gate's the column sums of dy_t (k_t n_{t-1} - n_t) times
g (1 - g).

Why (issue 16): under torch.compile inductor fuses that backward into one kernel that adds every token's
row to the three (V, D) tables with an fp32 atomic per element: 150 M atomics a `record` micro-batch
(0.35 ms a call on an H200, session 39's profile, against about 0.1 ms for the bytes it reads). Here:
- forward: one kernel writes y and rstd (N,) fp32; each program sums its rows' squares a column block at a
  time and recomputes the row before (the smear's) from the tables (L2-resident), not from memory;
- backward, first kernel: de_t in the order of the rows, written in the tables' dtype (the gradient of the
  gathered rows, bf16 in training: the dtype eager's embedding backward sums; inductor kept it fp32), with
  each program's partial sums for the scale and the gate (dy_t (k_t n_{t-1} - n_t) summed as
  n_t (k_{t+1} dy_{t+1} - dy_t), so no row is recomputed);
- backward, second kernel: the positions sorted by id once (torch.sort); a program takes R sorted positions s
  and a column block: tok's and ec's gradients at i_s take de_s and s de_s ep[p_s], and ep's at i_s takes
  s de_{s+1} ec[i_{s+1}] where p_{s+1} = i_s (every previous id is the id before it, but a sequence's first
  and a masked BOS, whose previous id 0 they add to ep's row 0 themselves), so one order serves all three.
  Rows of equal ids are summed in the tile first (a 0/1 matrix of equal keys times the values, tl.dot in
  tf32x3: about fp32) and added once a run: the atomics drop about R-fold.
fp32 sums in another order than the plain path's and de rounded to the tables' dtype: a rounding apart
(atomics make it nondeterministic in the last bits, as inductor's do).
benchmarks/embed_bench.py times it against inductor's plain path (RESULTS.md, session 40).

torch.library custom ops (lmcore::embed_smear, lmcore::embed_smear_backward) with fake kernels, so
torch.compile keeps them in its graph as calls. Their CPU kernels (`_forward_math`, `_backward_math`)
are PyTorch, which tests check against autograd of the plain path; the Triton kernels run on CUDA for
a power-of-two width and are checked against them (tests marked cuda). Imported only by
GPT.use_fused_embed: the exported script embeds it only with the switch on (lmcore.export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmcore.layers import RMS_EPS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None

# The forward's (rows, columns, warps) a program (it walks its rows' columns in blocks); the backward's (rows, row
# blocks and warps a program of its first kernel, rows, columns and warps of its second; the second's rows and
# columns at least 16, tl.dot's smallest side). benchmarks/embed_bench.py sweeps the choices
FWD_TILE, BWD_TILE = (8, 512, 8), (2, 16, 1, 16, 128, 4)
BLOCK_D = 16


def _keep(ids: Tensor, bos_id: int) -> Tensor:
    """k_t in fp32: 0 at BOS tokens with bos_id >= 0 (the SmearGate's mask), else 1."""
    return (ids != bos_id).float() if bos_id >= 0 else torch.ones_like(ids, dtype=torch.float32)


def _shift(x: Tensor, step: int) -> Tensor:
    """x along dim 1 (tokens) moved by `step` (+1: x_{t-1}, -1: x_{t+1}), zeros where it runs out."""
    pad = (0, 0) * (x.dim() - 2)
    return F.pad(x[:, :-1], (*pad, 1, 0)) if step > 0 else F.pad(x[:, 1:], (*pad, 0, 1))


def _embedded(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor):
    """(e, ep[p], ec[i]) in fp32 for (B, T) ids: e = tok[i] + s ep[p] ec[i]."""
    epg, ecg = ep.float()[prev], ec.float()[ids]
    return tok.float()[ids] + scale.float() * epg * ecg, epg, ecg


def _forward_math(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
                  bos_id: int) -> tuple[Tensor, Tensor]:
    """(y (B, T, D) in tok's dtype, rstd (B, T) fp32)."""
    e, _, _ = _embedded(ids, prev, tok, ep, ec, scale)
    rstd = torch.rsqrt(e.square().mean(-1) + RMS_EPS)
    n = e * rstd[..., None]
    g = torch.sigmoid(gate.float())
    y = (1 - g) * n + g * _keep(ids, bos_id)[..., None] * _shift(n, 1)
    return y.to(tok.dtype), rstd


def _backward_math(dy: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor,
                   gate: Tensor, rstd: Tensor, bos_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dtok, dep, dec in the tables' dtype, dscale in scale's, dgate in gate's), from the saved rstd; sums in
    fp32."""
    e, epg, ecg = _embedded(ids, prev, tok, ep, ec, scale)
    n, keep, dyf = e * rstd[..., None], _keep(ids, bos_id)[..., None], dy.float()
    g = torch.sigmoid(gate.float())
    dn = (1 - g) * dyf + g * _shift(keep * dyf, -1)
    de = rstd[..., None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    d = tok.size(1)
    dscale = (de * epg * ecg).sum()
    de = de.to(tok.dtype).float()  # the gradient of the tables' gathered rows, in their dtype (as eager's)
    dtok = torch.zeros_like(tok, dtype=torch.float32).index_add_(0, ids.flatten(), de.reshape(-1, d))
    sde = scale.float() * de
    dec = torch.zeros_like(dtok).index_add_(0, ids.flatten(), (sde * epg).reshape(-1, d))
    dep = torch.zeros_like(dtok).index_add_(0, prev.flatten(), (sde * ecg).reshape(-1, d))
    dgate = (dyf * (keep * _shift(n, 1) - n)).sum((0, 1)) * g * (1 - g)
    return dtok.to(tok.dtype), dep.to(ep.dtype), dec.to(ec.dtype), dscale.to(scale.dtype), dgate.to(gate.dtype)


if triton is not None:
    _EPS = tl.constexpr(RMS_EPS)  # jit code reads globals only as constexprs

    @triton.jit
    def _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, cols, D: tl.constexpr):
        """(e, ep[p], ec[i]) fp32 of `rows` (R,) at columns `cols` (BD,), zeros where not `live`."""
        m = live[:, None]
        i = tl.load(ids_ptr + rows, mask=live, other=0).to(tl.int32)[:, None] * D  # tables under 2^31 elements
        p = tl.load(prev_ptr + rows, mask=live, other=0).to(tl.int32)[:, None] * D
        epg = tl.load(ep_ptr + p + cols[None, :], mask=m, other=0.0).to(tl.float32)
        ecg = tl.load(ec_ptr + i + cols[None, :], mask=m, other=0.0).to(tl.float32)
        e = tl.load(tok_ptr + i + cols[None, :], mask=m, other=0.0).to(tl.float32) + s * epg * ecg
        return e, epg, ecg

    @triton.jit
    def _index(x, WIDE: tl.constexpr):
        """x as the kernels' row index: int64 where rows x width reaches 2^31 (WIDE), else int32."""
        if WIDE:
            x = x.to(tl.int64)
        else:
            x = x.to(tl.int32)
        return x

    @triton.jit
    def _keep_of(i, BOS: tl.constexpr):
        """k for ids i: 0 at BOS (BOS >= 0), else 1, fp32."""
        k = (i == i).to(tl.float32)
        if BOS >= 0:
            k = (i != BOS).to(tl.float32)
        return k

    @triton.jit
    def _row_rstd(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, D: tl.constexpr, BD: tl.constexpr):
        """1 / rms(e) of `rows`, the squares summed a column block at a time (the same order for every row)."""
        sq = tl.zeros(rows.shape, dtype=tl.float32)
        for c in tl.static_range(0, D, BD):
            e, _, _ = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, c + tl.arange(0, BD), D)
            sq += tl.sum(e * e, axis=1)
        return tl.math.rsqrt(sq / D + _EPS)

    @triton.jit
    def _embed_fwd_kernel(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, scale_ptr, gate_ptr, y_ptr, rstd_ptr, n_rows, T,
                          D: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, BOS: tl.constexpr, WIDE: tl.constexpr):
        rows = _index(tl.program_id(0), WIDE) * R + tl.arange(0, R)
        live = rows < n_rows
        had = live & (rows % T > 0)  # the row before is of the same sequence
        s = tl.load(scale_ptr).to(tl.float32)
        k = _keep_of(tl.load(ids_ptr + rows, mask=live, other=0), BOS)
        if BD == D:  # whole rows: each row's gathers once (the same sums as one block of _row_rstd)
            cols = tl.arange(0, D)
            e, _, _ = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, cols, D)
            e0, _, _ = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows - 1, had, cols, D)
            rstd = tl.math.rsqrt(tl.sum(e * e, axis=1) / D + _EPS)
            rstd0 = tl.math.rsqrt(tl.sum(e0 * e0, axis=1) / D + _EPS)
            g = tl.sigmoid(tl.load(gate_ptr + cols).to(tl.float32))[None, :]
            y = (1.0 - g) * (e * rstd[:, None]) + g * (k[:, None] * (e0 * rstd0[:, None]))
            tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=live[:, None])
        else:  # the squares summed a column block at a time, then the values
            rstd = _row_rstd(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, D, BD)
            rstd0 = _row_rstd(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows - 1, had, D, BD)
            for c in tl.static_range(0, D, BD):
                cols = c + tl.arange(0, BD)
                g = tl.sigmoid(tl.load(gate_ptr + cols).to(tl.float32))[None, :]
                e, _, _ = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, cols, D)
                e0, _, _ = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows - 1, had, cols, D)
                y = (1.0 - g) * (e * rstd[:, None]) + g * (k[:, None] * (e0 * rstd0[:, None]))
                tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty),
                         mask=live[:, None])
        tl.store(rstd_ptr + rows, rstd, mask=live)

    @triton.jit
    def _embed_bwd_rows_kernel(dy_ptr, ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, scale_ptr, gate_ptr, rstd_ptr,
                               de_ptr, dgate_part_ptr, dscale_part_ptr, n_rows, T,
                               D: tl.constexpr, R: tl.constexpr, ITERS: tl.constexpr, BOS: tl.constexpr,
                               WIDE: tl.constexpr):
        """ITERS blocks of R rows in order: de_t = rstd_t (dn_t - n_t mean(dn_t n_t)), dn_t = (1 - g) dy_t +
        g k_{t+1} dy_{t+1}, written in the tables' dtype (de_ptr's); the program's partial sums of the scale's
        gradient (de_t ep[p_t] ec[i_t], de in fp32) and of the gate's (n_t (k_{t+1} dy_{t+1} - dy_t): the sum of
        dy_t (k_t n_{t-1} - n_t) over the tokens, reindexed)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, D)
        s = tl.load(scale_ptr).to(tl.float32)
        g = tl.sigmoid(tl.load(gate_ptr + cols).to(tl.float32))[None, :]
        dgate = tl.zeros((D,), dtype=tl.float32)
        dscale = tl.zeros((R,), dtype=tl.float32)
        for it in range(ITERS):
            rows = (_index(pid, WIDE) * ITERS + it) * R + tl.arange(0, R)
            live = rows < n_rows
            nx = live & (rows % T < T - 1)  # the row after is of the same sequence
            e, epg, ecg = _gather_e(ids_ptr, prev_ptr, tok_ptr, ep_ptr, ec_ptr, s, rows, live, cols, D)
            rstd = tl.load(rstd_ptr + rows, mask=live, other=0.0)
            n = e * rstd[:, None]
            at = rows[:, None] * D + cols[None, :]
            dy = tl.load(dy_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
            k1 = _keep_of(tl.load(ids_ptr + rows + 1, mask=nx, other=0), BOS) * nx.to(tl.float32)
            kdy1 = k1[:, None] * tl.load(dy_ptr + at + D, mask=nx[:, None], other=0.0).to(tl.float32)
            dn = (1.0 - g) * dy + g * kdy1
            de = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
            tl.store(de_ptr + at, de.to(de_ptr.dtype.element_ty), mask=live[:, None])
            dgate += tl.sum(n * (kdy1 - dy), axis=0)
            dscale += tl.sum(de * epg * ecg, axis=1)
        tl.store(dgate_part_ptr + pid * D + cols, dgate)
        tl.store(dscale_part_ptr + pid, tl.sum(dscale, axis=0))

    @triton.jit
    def _embed_bwd_scatter_kernel(de_ptr, order_ptr, keys_ptr, ids_ptr, prev_ptr, ep_ptr, ec_ptr, scale_ptr,
                                  dtok_ptr, dep_ptr, dec_ptr, n_rows, T, D: tl.constexpr, R: tl.constexpr,
                                  BD: tl.constexpr, BOS: tl.constexpr, WIDE: tl.constexpr):
        """R positions in ids order (rows s, i_s sorted) and BD columns: tok's and ec's gradients at i_s take de_s
        and s de_s ep[p_s]; ep's at i_s takes s de_{s+1} ec[i_{s+1}] where p_{s+1} = i_s (the next token of the
        sequence, not a masked BOS); rows whose previous id is 0 otherwise (a sequence's first, a masked BOS) add
        s de_s ec[i_s] to ep's row 0 themselves. Rows of equal ids are summed in the tile first (a 0/1 matrix of
        equal keys times the values, in about fp32's precision: runs, as the keys are sorted) and added once a run."""
        r = tl.arange(0, R)
        pos = _index(tl.program_id(0), WIDE) * R + r
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        live = pos < n_rows
        rows = _index(tl.load(order_ptr + pos, mask=live, other=0), WIDE)
        key = tl.load(keys_ptr + pos, mask=live, other=-1).to(tl.int32)
        key_after = tl.load(keys_ptr + pos + 1, mask=(pos + 1 < n_rows) & (r < R - 1), other=-2).to(tl.int32)
        same = (key[:, None] == key[None, :]).to(tl.float32)  # (R, R): runs of equal ids
        t = rows % T
        nx = live & (t < T - 1)
        i1 = tl.load(ids_ptr + rows + 1, mask=nx, other=0)
        shifted = nx & (_keep_of(i1, BOS) > 0.0)  # p_{s+1} = i_s
        direct = live & ((t == 0) | (_keep_of(key, BOS) == 0.0))  # p_s = 0, not i_{s-1}
        s = tl.load(scale_ptr).to(tl.float32)
        at = rows[:, None] * D + cols[None, :]
        de0 = tl.load(de_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
        de1 = tl.load(de_ptr + at + D, mask=shifted[:, None], other=0.0).to(tl.float32)
        p = tl.load(prev_ptr + rows, mask=live, other=0).to(tl.int32)
        epg0 = tl.load(ep_ptr + p[:, None] * D + cols[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        ecg1 = tl.load(ec_ptr + i1.to(tl.int32)[:, None] * D + cols[None, :], mask=shifted[:, None],
                       other=0.0).to(tl.float32)
        dst = key[:, None] * D + cols[None, :]
        flush = ((key != key_after) & live)[:, None] & (cols[None, :] < D)
        tl.atomic_add(dtok_ptr + dst, tl.dot(same, de0, input_precision="tf32x3"), mask=flush, sem="relaxed")
        tl.atomic_add(dec_ptr + dst, tl.dot(same, s * de0 * epg0, input_precision="tf32x3"), mask=flush,
                      sem="relaxed")
        tl.atomic_add(dep_ptr + dst, tl.dot(same, s * de1 * ecg1, input_precision="tf32x3"), mask=flush,
                      sem="relaxed")
        n_direct = tl.sum(direct.to(tl.int32), axis=0)
        if n_direct > 0:
            ecg0 = tl.load(ec_ptr + key[:, None] * D + cols[None, :], mask=direct[:, None], other=0.0).to(tl.float32)
            tl.atomic_add(dep_ptr + cols, tl.sum(s * de0 * ecg0, axis=0), sem="relaxed")


def _use_triton(tok: Tensor) -> bool:
    """Triton for CUDA tables whose width is a power of two (tl.arange's sizes) of at least BLOCK_D."""
    d = tok.size(1)
    return triton is not None and tok.is_cuda and d & (d - 1) == 0 and d >= BLOCK_D and tok.numel() < 1 << 31


def _wide(ids: Tensor, d: int) -> bool:
    """Row offsets past int32 (rows x width + two rows reach 2^31): the kernels index in int64."""
    return (ids.numel() + 2) * d >= 1 << 31


def _forward_triton(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
                    bos_id: int, tile: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel: (y, rstd) as _forward_math; `tile` (rows, columns, warps) a program."""
    rows, cols, warps = tile or FWD_TILE
    n, d = ids.numel(), tok.size(1)
    y = tok.new_empty((*ids.shape, d))
    rstd = torch.empty(ids.shape, dtype=torch.float32, device=ids.device)
    if n:
        _embed_fwd_kernel[(triton.cdiv(n, rows),)](ids, prev, tok, ep, ec, scale, gate, y, rstd, n, ids.size(-1),
                                                   D=d, R=rows, BD=min(cols, d), BOS=bos_id, WIDE=_wide(ids, d),
                                                   num_warps=warps)
    return y, rstd


def _sorted(ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(keys, order): the flattened ids (in [0, vocab)) sorted and their positions; int16 keys where they fit (a
    shorter radix sort)."""
    return torch.sort(ids.flatten().to(torch.int16 if vocab <= 1 << 15 else torch.int32))


def _backward_de(dy: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor,
                 gate: Tensor, rstd: Tensor, bos_id: int, rows: int, iters: int,
                 warps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's first kernel: (de in the tables' dtype, the scale's gradient in fp32, the gate's before the
    sigmoid's derivative), `iters` blocks of `rows` a program at `warps`."""
    n, d = ids.numel(), tok.size(1)
    programs = triton.cdiv(n, rows * iters)
    de = torch.empty(dy.shape, dtype=tok.dtype, device=dy.device)
    dgate_part = torch.empty(programs, d, dtype=torch.float32, device=dy.device)  # every program writes its row
    dscale_part = torch.empty(programs, dtype=torch.float32, device=dy.device)
    if n:
        _embed_bwd_rows_kernel[(programs,)](dy, ids, prev, tok, ep, ec, scale, gate, rstd, de, dgate_part,
                                            dscale_part, n, ids.size(-1), D=d, R=rows, ITERS=iters, BOS=bos_id,
                                            WIDE=_wide(ids, d), num_warps=warps)
    return de, dscale_part.sum(), dgate_part.sum(0)


def _backward_tables(de: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor,
                     bos_id: int, rows: int, cols: int, warps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's sort and second kernel: the tables' gradients (tok, ep, ec) in fp32 from de, (rows, cols) a
    program at `warps`."""
    n, d = ids.numel(), tok.size(1)
    dtok, dep, dec = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (tok, ep, ec))
    if n:
        keys, order = _sorted(ids, tok.size(0))
        cols = min(cols, d)
        _embed_bwd_scatter_kernel[(triton.cdiv(n, rows), d // cols)](
            de, order, keys, ids, prev, ep, ec, scale, dtok, dep, dec, n, ids.size(-1), D=d, R=rows, BD=cols,
            BOS=bos_id, WIDE=_wide(ids, d), num_warps=warps)
    return dtok, dep, dec


def _backward_triton(dy: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor,
                     gate: Tensor, rstd: Tensor, bos_id: int, tile: tuple[int, int, int, int, int] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels, de (in the tables' dtype) over the rows in order, then the tables' sums over the
    positions in ids order: the gradients as _backward_math's. `tile`: BWD_TILE's choices."""
    rows, iters, warps, srows, scols, swarps = tile or BWD_TILE
    de, dscale, dgate = _backward_de(dy, ids, prev, tok, ep, ec, scale, gate, rstd, bos_id, rows, iters, warps)
    dtok, dep, dec = _backward_tables(de, ids, prev, tok, ep, ec, scale, bos_id, srows, scols, swarps)
    g = torch.sigmoid(gate.float())
    return (dtok.to(tok.dtype), dep.to(ep.dtype), dec.to(ec.dtype), dscale.to(scale.dtype),
            (dgate * g * (1 - g)).to(gate.dtype))


@torch.library.custom_op("lmcore::embed_smear", mutates_args=())
def _embed_smear(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
                 bos_id: int) -> tuple[Tensor, Tensor]:
    if _use_triton(tok):
        return _forward_triton(ids, prev, tok, ep, ec, scale, gate, bos_id)
    return _forward_math(ids, prev, tok, ep, ec, scale, gate, bos_id)


@_embed_smear.register_fake
def _(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
      bos_id: int) -> tuple[Tensor, Tensor]:
    return tok.new_empty((*ids.shape, tok.size(1))), ids.new_empty(ids.shape, dtype=torch.float32)


@torch.library.custom_op("lmcore::embed_smear_backward", mutates_args=())
def _embed_smear_backward(dy: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor,
                          gate: Tensor, rstd: Tensor, bos_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _use_triton(tok):
        return _backward_triton(dy, ids, prev, tok, ep, ec, scale, gate, rstd, bos_id)
    return _backward_math(dy, ids, prev, tok, ep, ec, scale, gate, rstd, bos_id)


@_embed_smear_backward.register_fake
def _(dy: Tensor, ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
      rstd: Tensor, bos_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(tok), torch.empty_like(ep), torch.empty_like(ec), torch.empty_like(scale), \
        torch.empty_like(gate)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.bos_id = inputs
    ctx.save_for_backward(*tensors, output[1])


def _backward(ctx, dy: Tensor, _d_rstd: Tensor):
    ids, prev, tok, ep, ec, scale, gate, rstd = ctx.saved_tensors
    grads = _embed_smear_backward(dy.contiguous(), ids, prev, tok, ep, ec, scale, gate, rstd, ctx.bos_id)
    return None, None, *grads, None


_embed_smear.register_autograd(_backward, setup_context=_setup_context)


def embed_smear(ids: Tensor, prev: Tensor, tok: Tensor, ep: Tensor, ec: Tensor, scale: Tensor, gate: Tensor,
                bos_id: int = -1) -> Tensor:
    """GPT.embed's output (B, T, D) in the tables' dtype for (B, T) ids and their previous ids, the token table
    tok, the bigram's tables ep (previous) and ec (current) and scale, the SmearGate's gate; bos_id >= 0 masks
    the smear at BOS tokens (model.bos_mask). The scale and the gate are rounded to the tables' dtype first, as
    the plain path does."""
    dt = tok.dtype
    y, _ = _embed_smear(ids.contiguous(), prev.contiguous(), tok.contiguous(), ep.contiguous(), ec.contiguous(),
                        scale.to(dt), gate.to(dt).contiguous(), int(bos_id))
    return y
