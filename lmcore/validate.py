"""Plain validation, the one function for it: a token stream cut into non-overlapping
`seq_len` sequences, every target scored once, as loss (nats/token) and bits per byte
(lmcore.bpb byte counting).

Training's periodic and final validations (`lmcore.train`) and evaluation's plain pass
(`lmcore.evaluate.plain_eval`, the same function) both call `plain_eval`, so a model scores
the same wherever it is validated. Ranks take contiguous shares of the sequences and the
sums are all-reduced. The sliding-window and TTT scoring of the challenge is lmcore.ttt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmcore.bpb import BpbMeter, ByteTables
from lmcore.errors import InputError
from lmcore.runtime import ONE_PROCESS, DistInfo, autocast, rank_slice

__all__ = ["plain_eval"]


@torch.no_grad()
def plain_eval(
    model: torch.nn.Module,
    tokens: Tensor,
    seq_len: int,
    tables: ByteTables,
    device: torch.device | str,
    *,
    bf16: bool = False,
    batch_seqs: int = 32,
    pad: bool = True,
    dist: DistInfo = ONE_PROCESS,
) -> dict[str, Any]:
    """Score the (tokens.numel() - 1) // seq_len sequences of `tokens` (1-D ids, any device).

    `model` is a GPT or its compiled wrapper, called as model(x, y, reduction="none") in
    batches of `batch_seqs` sequences (bf16 autocast when `bf16`); each batch is copied to
    `device` on its own, so the stream itself may stay on the host. With `pad` a short last
    batch is filled up to the common size with masked rows, so a compiled model sees one
    shape (training's eager model skips it). The model's train/eval mode is restored.
    Returns BpbMeter.as_dict(): loss, bpb, nats, tokens, bytes (all ranks' sums).
    """
    device = torch.device(device)
    tok = tokens.reshape(-1)
    n_seqs = (tok.numel() - 1) // seq_len
    if n_seqs <= 0:
        raise InputError(f"{tok.numel()} val tokens are too few for seq_len {seq_len}")
    lo, hi = rank_slice(n_seqs, dist.rank, dist.world_size)
    views = tok.unfold(0, seq_len + 1, seq_len)  # (n_seqs, seq_len + 1)
    meter = BpbMeter(tables, device)
    bs = max(1, min(batch_seqs, max(hi - lo, 1)))
    was_training = model.training
    model.eval()
    try:
        for b0 in range(lo, hi, bs):
            idx = torch.arange(b0, min(b0 + bs, hi), device=tok.device)
            k = bs - idx.numel() if pad else 0
            if k:
                idx = torch.cat([idx, idx[-1:].expand(k)])
            w = views[idx].to(device=device, dtype=torch.int64)
            x, y = w[:, :-1], w[:, 1:]
            with autocast(device, bf16):
                nll = model(x, y, reduction="none")
            mask = (torch.arange(bs, device=device) < bs - k)[:, None].expand_as(y) if k else None
            meter.add(nll, x, y, mask=mask)
    finally:
        model.train(was_training)
    if dist.world_size > 1:
        meter.all_reduce()
    return meter.as_dict()
