"""Sliding-window scoring and score-first LatentMask test-time training (TTT), SPEC.md
section 6: the `Evaluator` engine, `sliding_eval` and `ttt_eval` (windows and chunks from
lmcore.windows; `lmcore.evaluate.eval_run` runs it on a packed model).

TTT goes chunk by chunk: score the chunk's windows with the current masks (no grad), then,
unless it is the last chunk, train the masks on the chunk's tokens as `seq_len` sequences
for `ttt_epochs` epochs (batches of `ttt_batch_seqs`) with the sign-momentum optimizer, the
gradient clipped to `ttt_grad_clip`, lr warmed up / flat / cosine over the chunk index.
The model is frozen; the masks are a `LatentMasks` module passed explicitly to
`GPT.forward(latent=...)`.

Speed. Windows are gathered from an `unfold` view of the token stream (one index op per
batch), scored with a per-window offset mask (no Python loop over windows or tokens), and
summed on the device in float64. On CUDA the scoring forward is compiled once
(`dynamic=False`, the latent masks a forward argument); a short last batch is padded to
the fixed shape with masked rows, so nothing recompiles. The no-TTT sliding eval runs
through the same graph with identity masks (sigmoid = 1, bias = 0). Mask training runs
eager unless `compile_train` (eval.compile_train): on one H100 that compile costs ~45 s
more and saves ~0.4 s a chunk, so it pays off beyond ~110 chunks, not on the proxy val.

Ranks. Each chunk's windows are split across ranks in contiguous slices; each training
batch of `ttt_batch_seqs` sequences is split across ranks in contiguous slices and the
mask gradient is the all-reduced sum of the ranks' shares of the batch-mean loss, so the
masks follow the same trajectory for any world size (with 32 sequences a chunk and equal
slices, as in the record setting, this is the original's per-rank-mean AVG). Sums are
all-reduced at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from lmcore.bpb import LN2, ByteTables, token_bytes
from lmcore.config import EvalConfig
from lmcore.model import GPT, LatentMasks
from lmcore.runtime import ONE_PROCESS, DistInfo, autocast, rank_slice, synchronize
from lmcore.windows import plan_chunks, plan_windows

__all__ = ["Evaluator", "IDENTITY_MASK", "SignMomentum", "sliding_eval", "ttt_eval", "ttt_lr"]

IDENTITY_MASK = 1.0e4  # sigmoid(1e4) == 1.0 exactly in float32: masks that change nothing
LogFn = Callable[[str], None]


def ttt_lr(ci: int, n_chunks: int, cfg: EvalConfig) -> float:
    """LR for training on chunk ci: linear warm-up, flat, then cosine to 0 over the chunks."""
    frac = ci / max(n_chunks - 1, 1)
    if frac < cfg.ttt_warmup_frac:
        return cfg.ttt_lr * frac / cfg.ttt_warmup_frac
    if frac < cfg.ttt_flat_until:
        return cfg.ttt_lr
    decay = (frac - cfg.ttt_flat_until) / (1.0 - cfg.ttt_flat_until)
    return cfg.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * decay))


# ---------------------------------------------------------------------------- optimizer


class SignMomentum:
    """buf = m * buf + g; u = sign(g + m * buf) scaled to norm sqrt(n) per block row; p -= lr * u.

    The LatentMasks tensors are (layers, n): each row is one block's vector, normalised on
    its own (as the original's per-block tensors are).
    """

    def __init__(self, params: list[Tensor], momentum: float):
        self.params = list(params)
        self.momentum = momentum
        self.bufs = [torch.zeros_like(p) for p in self.params]

    def reset(self) -> None:
        for b in self.bufs:
            b.zero_()

    @torch.no_grad()
    def step(self, lr: float) -> None:
        m = self.momentum
        for p, buf in zip(self.params, self.bufs):
            g = p.grad
            buf.mul_(m).add_(g)
            u = torch.sign(g + m * buf)
            norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-8)
            u.mul_(math.sqrt(p.shape[-1]) / norm)
            p.sub_(lr * u)


# ---------------------------------------------------------------------------- evaluator


def _all_reduce(t: Tensor, dist: DistInfo) -> None:
    if dist.world_size > 1 and tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


def _sums_dict(sums: Tensor) -> dict[str, Any]:
    nats, toks, byts = (float(x) for x in sums.tolist())
    return {
        "loss": nats / toks if toks > 0 else float("nan"),
        "bpb": (nats / LN2) / byts if byts > 0 else float("nan"),
        "nats": nats,
        "tokens": round(toks),
        "bytes": round(byts),
    }


class Evaluator:
    """Scores windows and trains latent masks for one model; owns the (compiled) forward.

    One Evaluator serves the sliding baseline and TTT with a single compiled graph per
    grad mode: the same `LatentMasks` object is used throughout (identity values for the
    baseline). `compile=None` compiles the scoring forward on CUDA when cfg.compile;
    `compile_train` (None: cfg.compile_train) also compiles the mask-training
    forward+backward where the scoring forward is compiled. `pad=None` pads
    batches to a fixed shape exactly where a compiled graph runs them.
    """

    def __init__(
        self,
        model: GPT,
        cfg: EvalConfig,
        tables: ByteTables,
        device: torch.device | str,
        *,
        bf16: bool = False,
        dist: DistInfo = ONE_PROCESS,
        compile: bool | None = None,
        pad: bool | None = None,
        compile_train: bool | None = None,
    ):
        self.device = torch.device(device)
        self.model = model
        self.cfg = cfg
        self.tables = tables.to(self.device)
        self.bf16 = bf16
        self.dist = dist
        if compile is None:
            compile = cfg.compile and self.device.type == "cuda"
        self.compiled = bool(compile)
        if compile_train is None:
            compile_train = cfg.compile_train
        self.compile_train = self.compiled and bool(compile_train)
        self.pad = self.compiled if pad is None else bool(pad)
        self.pad_train = self.pad and (self.compile_train or pad is not None)
        compiled_model = torch.compile(model, dynamic=False) if self.compiled else model
        self.fwd: Callable[..., Tensor] = compiled_model
        self.fwd_train: Callable[..., Tensor] = compiled_model if self.compile_train else model
        self.latent = LatentMasks(model.cfg, init=cfg.mask_init).to(self.device)
        self.mask_params = [self.latent.mlp_mask, self.latent.mlp_bias, self.latent.attn_mask, self.latent.attn_bias]
        self.opt = SignMomentum(self.mask_params, cfg.ttt_momentum)
        self.compile_s = 0.0

    # -------------------------------------------------------------- state
    @torch.no_grad()
    def reset_masks(self, identity: bool = False) -> None:
        """Masks at their init (or identity: sigmoid = 1, bias = 0) and a fresh optimizer."""
        fill = IDENTITY_MASK if identity else self.cfg.mask_init
        self.latent.mlp_mask.fill_(fill)
        self.latent.attn_mask.fill_(fill)
        self.latent.mlp_bias.zero_()
        self.latent.attn_bias.zero_()
        for p in self.mask_params:
            p.grad = None
        self.opt.reset()

    def _freeze(self) -> tuple[dict[str, bool], bool]:
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        was_training = self.model.training
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        return flags, was_training

    def _unfreeze(self, state: tuple[dict[str, bool], bool]) -> None:
        flags, was_training = state
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        self.model.train(was_training)

    def _sync(self) -> None:
        synchronize(self.device)

    # -------------------------------------------------------------- kernels
    @torch.no_grad()
    def _score(self, views: Tensor, starts: Tensor, score_from: Tensor, length: int) -> Tensor:
        """[nats, tokens, bytes] (float64) of the given windows, in batches of batch_seqs."""
        out = torch.zeros(3, dtype=torch.float64, device=self.device)
        n = int(starts.numel())
        bs = self.cfg.batch_seqs
        pos = torch.arange(length, device=self.device)
        for b0 in range(0, n, bs):
            st, sf = starts[b0 : b0 + bs], score_from[b0 : b0 + bs]
            valid = None
            if self.pad and st.numel() < bs:
                k = bs - st.numel()
                valid = torch.arange(bs, device=self.device) < st.numel()
                st = torch.cat([st, st[-1:].expand(k)])
                sf = torch.cat([sf, sf[-1:].expand(k)])
            w = views[st]  # (B, L + 1)
            x, y = w[:, :-1], w[:, 1:]
            with autocast(self.device, self.bf16):
                nll = self.fwd(x, y, reduction="none", latent=self.latent)
            mask = pos[None, :] >= sf[:, None]
            if valid is not None:
                mask &= valid[:, None]
            nb = token_bytes(self.tables, x, y)
            out += torch.stack(
                [
                    torch.where(mask, nll.to(torch.float64), 0.0).sum(),
                    mask.sum().to(torch.float64),
                    torch.where(mask, nb, 0).sum().to(torch.float64),
                ]
            )
        return out

    def _train_chunk(self, views: Tensor, chunk_start: int, n_seqs: int, seq_len: int, lr: float) -> None:
        """ttt_epochs passes over the chunk's n_seqs sequences, one optimizer step per batch."""
        cfg, dist = self.cfg, self.dist
        W = dist.world_size
        local_bs = -(-cfg.ttt_batch_seqs // W)
        for _ in range(cfg.ttt_epochs):
            for b0 in range(0, n_seqs, cfg.ttt_batch_seqs):
                nb = min(cfg.ttt_batch_seqs, n_seqs - b0)
                lo, hi = rank_slice(nb, dist.rank, W)
                for p in self.mask_params:
                    p.grad = None
                if hi > lo:
                    idx = chunk_start + (b0 + torch.arange(lo, hi, device=self.device)) * seq_len
                    weight = torch.ones(hi - lo, device=self.device)
                    if self.pad_train and idx.numel() < local_bs:
                        k = local_bs - idx.numel()
                        idx = torch.cat([idx, idx[-1:].expand(k)])
                        weight = torch.cat([weight, torch.zeros(k, device=self.device)])
                    w = views[idx]
                    x, y = w[:, :-1], w[:, 1:]
                    with autocast(self.device, self.bf16):
                        nll = self.fwd_train(x, y, reduction="none", latent=self.latent)
                    loss = (nll.float().sum(dim=1) * weight).sum() / (nb * seq_len)
                    loss.backward()
                else:
                    for p in self.mask_params:
                        p.grad = torch.zeros_like(p)
                if W > 1:
                    flat = torch.cat([p.grad.reshape(-1) for p in self.mask_params])
                    _all_reduce(flat, dist)
                    o = 0
                    for p in self.mask_params:
                        p.grad.copy_(flat[o : o + p.numel()].view_as(p))
                        o += p.numel()
                torch.nn.utils.clip_grad_norm_(self.mask_params, cfg.ttt_grad_clip)
                self.opt.step(lr)

    # -------------------------------------------------------------- warm-up
    def warmup(self, tokens: Tensor) -> float:
        """Compile (when compiled) both graphs on the real shapes; returns the seconds spent."""
        if not self.compiled:
            return 0.0
        seq_len = self.cfg.seq_len
        tok = tokens.to(self.device, torch.int64)
        total = tok.numel() - 1
        L = min(seq_len, total)
        views = tok.unfold(0, L + 1, 1)
        state = self._freeze()
        t0 = time.perf_counter()
        try:
            self.reset_masks()
            starts = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._score(views, starts, starts, L)
            n_seqs = min(self.cfg.ttt_batch_seqs, total // seq_len)
            if self.compile_train and self.cfg.ttt and self.cfg.ttt_epochs > 0 and n_seqs > 0:
                cfg, self.cfg = self.cfg, replace(self.cfg, ttt_epochs=1)
                try:
                    with torch.enable_grad():
                        self._train_chunk(views, 0, n_seqs, seq_len, 0.0)
                finally:
                    self.cfg = cfg
            self._sync()
        finally:
            self.reset_masks()
            self._unfreeze(state)
        dt = time.perf_counter() - t0
        self.compile_s += dt
        return dt

    # -------------------------------------------------------------- phases
    def run(
        self,
        tokens: Tensor,
        *,
        ttt: bool,
        stride: int | None = None,
        progress: bool = False,
        progress_every: int = 10,
        log: LogFn = print,
    ) -> dict[str, Any]:
        """Sliding-window eval of `tokens` (1-D ids), with score-first TTT when `ttt`."""
        cfg, dist = self.cfg, self.dist
        stride = cfg.stride if stride is None else stride
        seq_len = cfg.seq_len
        tok = tokens.to(self.device, torch.int64).reshape(-1)
        total = tok.numel() - 1
        plan = plan_windows(total, seq_len, stride)
        chunks = plan_chunks(plan, cfg.ttt_chunk_tokens)
        L = plan.length
        views = tok.unfold(0, L + 1, 1)  # views[s] = tokens[s : s + L + 1]
        starts = plan.starts.to(self.device)
        score_from = plan.score_from.to(self.device)
        n_chunks = chunks.n_chunks
        chunk_sums = torch.zeros(n_chunks, 3, dtype=torch.float64, device=self.device)
        train = ttt and cfg.ttt_epochs > 0
        state = self._freeze()
        self.reset_masks(identity=not ttt)
        t_score = t_train = 0.0
        self._sync()
        t_start = time.perf_counter()
        name = "ttt" if ttt else "sliding"
        try:
            for ci in range(n_chunks):
                w_lo, w_hi = chunks.windows(ci)
                if w_hi == w_lo:
                    continue
                lo, hi = rank_slice(w_hi - w_lo, dist.rank, dist.world_size)
                t0 = time.perf_counter()
                if hi > lo:
                    chunk_sums[ci] = self._score(
                        views, starts[w_lo + lo : w_lo + hi], score_from[w_lo + lo : w_lo + hi], L
                    )
                self._sync()
                t1 = time.perf_counter()
                t_score += t1 - t0
                if train and ci < n_chunks - 1:
                    c_start, c_end = chunks.token_range(ci, total)
                    n_seqs = (c_end - c_start) // seq_len
                    if n_seqs > 0:
                        with torch.enable_grad():
                            # n_seqs > 0 implies total >= seq_len, so L == seq_len here
                            self._train_chunk(views, c_start, n_seqs, seq_len, ttt_lr(ci, n_chunks, cfg))
                        self._sync()
                    t_train += time.perf_counter() - t1
                if progress and dist.is_main and (ci % progress_every == 0 or ci == n_chunks - 1):
                    run = _sums_dict(chunk_sums[: ci + 1].sum(0))
                    cur = _sums_dict(chunk_sums[ci])
                    local = " (rank 0's share)" if dist.world_size > 1 else ""
                    log(
                        f"{name} chunk {ci + 1}/{n_chunks} running bpb {run['bpb']:.6f} "
                        f"chunk bpb {cur['bpb']:.6f}{local} score {t_score:.1f}s train {t_train:.1f}s "
                        f"elapsed {time.perf_counter() - t_start:.1f}s"
                    )
        finally:
            self._unfreeze(state)
        _all_reduce(chunk_sums, dist)
        self._sync()
        elapsed = time.perf_counter() - t_start
        res = _sums_dict(chunk_sums.sum(0))
        per_chunk = [_sums_dict(r) for r in chunk_sums]
        cum = torch.cumsum(chunk_sums, 0)
        res.update(
            {
                "ttt": bool(ttt),
                "seq_len": seq_len,
                "stride": stride,
                "windows": plan.n,
                "chunks": n_chunks,
                "chunk_tokens": cfg.ttt_chunk_tokens,
                "time_s": {"score": t_score, "train": t_train, "total": elapsed},
                "chunk_bpb": [c["bpb"] for c in per_chunk],
                "chunk_running_bpb": [_sums_dict(r)["bpb"] for r in cum],
                "chunk_nats": [c["nats"] for c in per_chunk],
                "chunk_bytes": [c["bytes"] for c in per_chunk],
                "chunk_scored_tokens": [c["tokens"] for c in per_chunk],
            }
        )
        if ttt:
            res["mask_params"] = sum(p.numel() for p in self.mask_params)
            res["ttt_epochs"] = cfg.ttt_epochs
            res["ttt_lr"] = cfg.ttt_lr
        if total != res["tokens"]:  # legality: every target scored exactly once
            raise RuntimeError(f"scored {res['tokens']} targets, expected {total}")
        return res


# ---------------------------------------------------------------------------- functions


def sliding_eval(
    model: GPT,
    tokens: Tensor,
    cfg: EvalConfig,
    tables: ByteTables,
    device: torch.device | str,
    *,
    bf16: bool = False,
    dist: DistInfo = ONE_PROCESS,
    progress: bool = False,
    stride: int | None = None,
    log: LogFn = print,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Sliding-window eval without TTT (the TTT scorer with identity masks)."""
    ev = evaluator or Evaluator(model, cfg, tables, device, bf16=bf16, dist=dist)
    return ev.run(tokens, ttt=False, stride=stride, progress=progress, log=log)


def ttt_eval(
    model: GPT,
    tokens: Tensor,
    cfg: EvalConfig,
    tables: ByteTables,
    device: torch.device | str,
    *,
    bf16: bool = False,
    dist: DistInfo = ONE_PROCESS,
    progress: bool = False,
    stride: int | None = None,
    baseline: bool = False,
    log: LogFn = print,
    progress_every: int = 10,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Score-first LatentMask TTT eval (SPEC 6). With `baseline`, the sliding eval without
    TTT runs first (same compiled graph) and the result holds it under "sliding" with
    "ttt_gain_bpb" = sliding bpb - TTT bpb and "chunk_gain_bpb" per chunk."""
    ev = evaluator or Evaluator(model, cfg, tables, device, bf16=bf16, dist=dist)
    if ev.compiled and ev.compile_s == 0.0:
        ev.warmup(tokens)
    base = None
    if baseline:
        base = ev.run(tokens, ttt=False, stride=stride, progress=progress, log=log, progress_every=progress_every)
    res = ev.run(tokens, ttt=True, stride=stride, progress=progress, log=log, progress_every=progress_every)
    res["compile_s"] = ev.compile_s
    if base is not None:
        res["sliding"] = base
        res["ttt_gain_bpb"] = base["bpb"] - res["bpb"]
        res["chunk_gain_bpb"] = [b - t for b, t in zip(base["chunk_bpb"], res["chunk_bpb"])]
    return res
