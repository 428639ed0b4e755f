"""Where sliding-window evaluation looks (SPEC.md section 6): the windows over a token
stream and the TTT chunks they belong to. Pure index arithmetic, no model.

Windows. The val stream has `total` targets (target j is token j+1, predicted from tokens
<= j). All windows have length L = min(seq_len, total); window k ends at
e_k = min(L + k * stride, total) and scores the targets [e_{k-1}, e_k) (e_{-1} = 0): the
first window scores all of its L targets, every later one only its last <= stride
targets. Every target is scored exactly once, always with at least L - stride tokens of
context. (The original script also keeps the seq_len/stride - 1 short windows that start
after the last full one; each re-scores the last `stride` targets, so it scores
total + seq_len - stride targets. Where the total is a multiple of the stride, as with
the challenge's data, the two rules differ only by those duplicates.)

Chunks. The stream is cut into chunks of `ttt_chunk_tokens` targets; a window belongs to
the chunk holding its first scored target (lmcore.ttt scores and trains chunk by chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmcore.errors import InputError

__all__ = ["ChunkPlan", "WindowPlan", "plan_chunks", "plan_windows"]


@dataclass(frozen=True)
class WindowPlan:
    """Sliding windows over a stream of `total` targets (see the module docstring).

    Window i reads tokens[starts[i] : starts[i] + length + 1] (inputs and targets) and
    scores its positions >= score_from[i], i.e. targets
    [starts[i] + score_from[i], starts[i] + length).
    """

    total: int
    length: int
    stride: int
    starts: Tensor  # int64 (n,)
    score_from: Tensor  # int64 (n,)

    @property
    def n(self) -> int:
        return int(self.starts.numel())

    @property
    def first_scored(self) -> Tensor:
        return self.starts + self.score_from

    @property
    def ends(self) -> Tensor:
        return self.starts + self.length


def plan_windows(total: int, seq_len: int, stride: int) -> WindowPlan:
    """Windows of length min(seq_len, total) ending at min(L + k * stride, total)."""
    if total <= 0:
        raise InputError(f"nothing to evaluate: {total} targets (see data.val_max_tokens and the val shards)")
    if seq_len <= 0 or not 0 < stride <= seq_len:
        raise InputError(f"eval.stride={stride}, eval.seq_len={seq_len}: need 0 < stride <= seq_len")
    L = min(seq_len, total)
    n = 1 + -(-(total - L) // stride)
    ends = torch.clamp(L + torch.arange(n, dtype=torch.int64) * stride, max=total)
    prev_ends = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
    starts = ends - L
    return WindowPlan(total=total, length=L, stride=stride, starts=starts, score_from=prev_ends - starts)


@dataclass(frozen=True)
class ChunkPlan:
    """Chunks of `chunk_tokens` targets; windows [bounds[c], bounds[c+1]) belong to chunk c."""

    n_chunks: int
    chunk_tokens: int
    window_chunk: Tensor  # int64 (n_windows,)
    bounds: list[int]

    def windows(self, c: int) -> tuple[int, int]:
        return self.bounds[c], self.bounds[c + 1]

    def token_range(self, c: int, total: int) -> tuple[int, int]:
        """Targets [start, end) of chunk c."""
        return c * self.chunk_tokens, min((c + 1) * self.chunk_tokens, total)


def plan_chunks(plan: WindowPlan, chunk_tokens: int) -> ChunkPlan:
    """Assign each window to the chunk holding its first scored target."""
    if chunk_tokens <= 0:
        raise InputError(f"eval.ttt_chunk_tokens={chunk_tokens}: must be > 0")
    n_chunks = -(-plan.total // chunk_tokens)
    wc = torch.clamp(plan.first_scored // chunk_tokens, max=n_chunks - 1)
    counts = torch.bincount(wc, minlength=n_chunks)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    return ChunkPlan(n_chunks=n_chunks, chunk_tokens=chunk_tokens, window_chunk=wc, bounds=bounds)
