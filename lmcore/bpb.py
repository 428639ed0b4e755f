"""Bits per byte: per-token byte counts from a SentencePiece model, and a bpb meter.

The challenge scores a model in bits per byte of text (SPEC.md section 2). The number of
bytes a target token stands for is read from three lookup tables built once from the
tokenizer:

* ``base_bytes[id]``: UTF-8 length of the piece without its leading "▁"; byte-fallback
  pieces (``<0xNN>``) count 1; control, unknown and unused pieces count 0.
* ``leading_space[id]``: the piece starts with "▁" (a space in the text).
* ``boundary[id]``: control, unknown and unused pieces, and ids past the tokenizer's
  vocabulary (a model may have a larger embedding than the tokenizer).

A target gets ``base_bytes[tgt] + (leading_space[tgt] and not boundary[prev])`` bytes:
the leading space of a piece counts unless the previous token is a boundary (BOS, or
``<unk>``). bpb = (sum of nats / ln 2) / (sum of bytes), both summed in float64.

On BOS-prefixed documents the counted bytes equal the UTF-8 length of the text the
tokenizer actually encodes (after its normaliser) as long as no piece is ``<unk>``;
`byte_count_report` measures how a corpus relates to its raw text.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmcore.errors import InputError, InputNotFound

try:  # sentencepiece is needed only to build tables from a model file
    import sentencepiece as _spm
except ImportError:  # pragma: no cover - exercised only where sentencepiece is absent
    _spm = None

LN2 = math.log(2.0)
SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space

__all__ = [
    "BpbMeter",
    "ByteCountReport",
    "ByteTables",
    "bpb",
    "byte_count_report",
    "doc_bytes",
    "load_sentencepiece",
    "stream_bytes",
    "token_bytes",
]


def load_sentencepiece(model: str | os.PathLike[str] | Any) -> Any:
    """Return a SentencePieceProcessor for a model path, or the processor itself.

    A missing file raises `InputNotFound`, a file sentencepiece cannot load `InputError`,
    both naming the file.
    """
    if isinstance(model, (str, os.PathLike)):
        if _spm is None:
            raise ImportError("sentencepiece is required to read a tokenizer model")
        path = Path(model)
        if not path.is_file():
            raise InputNotFound(f"{path}: SentencePiece model not found")
        try:
            return _spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # how sentencepiece reports a bad file
            raise InputError(f"{path}: not a loadable SentencePiece model ({e})") from None
    if not hasattr(model, "id_to_piece") or not hasattr(model, "get_piece_size"):
        raise TypeError(f"expected a path or a SentencePieceProcessor, got {type(model).__name__}")
    return model


@dataclass
class ByteTables:
    """Per-token-id lookup tables for byte counting (all 1-D, same length).

    base_bytes: int16, leading_space: bool, boundary: bool.
    """

    base_bytes: Tensor
    leading_space: Tensor
    boundary: Tensor

    def __post_init__(self) -> None:
        n = self.base_bytes.shape
        if self.base_bytes.dim() != 1 or self.leading_space.shape != n or self.boundary.shape != n:
            raise ValueError(
                "ByteTables tensors must be 1-D and of one length, got "
                f"{tuple(self.base_bytes.shape)}, {tuple(self.leading_space.shape)}, "
                f"{tuple(self.boundary.shape)}"
            )
        if self.base_bytes.dtype != torch.int16:
            raise ValueError(f"base_bytes must be int16, got {self.base_bytes.dtype}")
        if self.leading_space.dtype != torch.bool or self.boundary.dtype != torch.bool:
            raise ValueError("leading_space and boundary must be bool tensors")

    @classmethod
    def from_sentencepiece(cls, model: str | Path | Any, vocab_size: int | None = None) -> ByteTables:
        """Build the tables from a SentencePiece model (path or processor).

        The tables have max(tokenizer vocab, vocab_size) entries; ids past the tokenizer's
        vocabulary are boundaries worth 0 bytes.
        """
        sp = load_sentencepiece(model)
        sp_vocab = int(sp.get_piece_size())
        n = sp_vocab if vocab_size is None else max(sp_vocab, int(vocab_size))
        base = [0] * n
        lead = [False] * n
        bound = [True] * n
        for i in range(sp_vocab):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue  # 0 bytes, boundary
            bound[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE_MARK):
                lead[i] = True
                piece = piece[len(SPACE_MARK) :]
            base[i] = len(piece.encode("utf-8"))
        return cls(
            base_bytes=torch.tensor(base, dtype=torch.int16),
            leading_space=torch.tensor(lead, dtype=torch.bool),
            boundary=torch.tensor(bound, dtype=torch.bool),
        )

    @property
    def size(self) -> int:
        """Number of token ids covered."""
        return int(self.base_bytes.shape[0])

    @property
    def device(self) -> torch.device:
        return self.base_bytes.device

    def to(self, device: torch.device | str) -> ByteTables:
        """The same tables on `device` (self if already there)."""
        device = torch.device(device)
        if self.base_bytes.device == device:
            return self
        return ByteTables(
            base_bytes=self.base_bytes.to(device),
            leading_space=self.leading_space.to(device),
            boundary=self.boundary.to(device),
        )


def token_bytes(tables: ByteTables, prev_ids: Tensor, tgt_ids: Tensor) -> Tensor:
    """Bytes each target token stands for (int32, shape of tgt_ids).

    base_bytes[tgt] + (leading_space[tgt] & ~boundary[prev]); prev_ids is the token just
    before each target (same shape as tgt_ids).
    """
    if prev_ids.shape != tgt_ids.shape:
        raise ValueError(f"prev_ids {tuple(prev_ids.shape)} and tgt_ids {tuple(tgt_ids.shape)} differ in shape")
    tgt = tgt_ids.long()
    prev = prev_ids.long()
    extra = tables.leading_space[tgt] & ~tables.boundary[prev]
    return tables.base_bytes[tgt].to(torch.int32) + extra.to(torch.int32)


def stream_bytes(tables: ByteTables, ids: Tensor | Sequence[int]) -> int:
    """Total bytes of the targets ids[1:] of a 1-D token stream (prev = the token before)."""
    t = torch.as_tensor(ids, dtype=torch.long, device=tables.device).reshape(-1)
    if t.numel() < 2:
        return 0
    return int(token_bytes(tables, t[:-1], t[1:]).sum().item())


def doc_bytes(tables: ByteTables, docs: Sequence[Sequence[int]], bos_id: int) -> list[int]:
    """Bytes counted for each document encoded as [bos_id] + ids (its targets are the ids;
    the BOS itself, as the target after the previous doc, is worth 0 bytes)."""
    if not docs:
        return []
    lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(lens.sum()))
    prev = np.full(flat.shape, bos_id, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    prev[1:] = flat[:-1]
    prev[starts[lens > 0]] = bos_id  # the first id of every doc follows its BOS
    nb = token_bytes(tables.to("cpu"), torch.from_numpy(prev), torch.from_numpy(flat))
    owner = torch.from_numpy(np.repeat(np.arange(len(docs)), lens))
    sums = torch.zeros(len(docs), dtype=torch.int64).index_add_(0, owner, nb.long())
    return sums.tolist()


def bpb(nats_sum: float, bytes_sum: float) -> float:
    """Bits per byte: (nats / ln 2) / bytes. NaN when there are no bytes."""
    if bytes_sum <= 0:
        return float("nan")
    return (float(nats_sum) / LN2) / float(bytes_sum)


class BpbMeter:
    """Accumulates nats, scored tokens and bytes in float64 on a device.

    Nothing is copied to the host until a result (`loss`, `bpb`, ...) is read, so `add`
    can be called every step without a sync. `all_reduce` sums the counters over ranks.
    """

    def __init__(self, tables: ByteTables, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else tables.device
        self.tables = tables.to(self.device)
        # [nats, tokens, bytes]
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        self._sums.zero_()

    def add(
        self,
        nll: Tensor,
        prev_ids: Tensor,
        tgt_ids: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Add per-target losses (nats) with their previous and target ids (same shape).

        `mask` (bool, same shape) optionally selects the targets to score.
        """
        if nll.shape != tgt_ids.shape:
            raise ValueError(f"nll {tuple(nll.shape)} and tgt_ids {tuple(tgt_ids.shape)} differ in shape")
        nb = token_bytes(self.tables, prev_ids.to(self.device), tgt_ids.to(self.device))
        nll64 = nll.detach().to(device=self.device, dtype=torch.float64)
        if mask is not None:
            if mask.shape != nll.shape:
                raise ValueError(f"mask {tuple(mask.shape)} and nll {tuple(nll.shape)} differ in shape")
            m = mask.to(device=self.device, dtype=torch.bool)
            nats = torch.where(m, nll64, torch.zeros_like(nll64)).sum()
            toks = m.sum().to(torch.float64)
            byts = torch.where(m, nb, torch.zeros_like(nb)).sum().to(torch.float64)
        else:
            nats = nll64.sum()
            toks = torch.full((), float(nll.numel()), dtype=torch.float64, device=self.device)  # no H2D copy
            byts = nb.sum().to(torch.float64)
        self._sums += torch.stack([nats, toks, byts])

    def add_sums(self, nats: float | Tensor, tokens: float | Tensor, bytes: float | Tensor) -> None:
        """Add already-summed nats, token count and byte count."""
        parts = [torch.as_tensor(x, dtype=torch.float64).to(self.device).reshape(()) for x in (nats, tokens, bytes)]
        self._sums += torch.stack(parts)

    def all_reduce(self) -> None:
        """Sum the counters over all ranks (no-op unless torch.distributed is initialized)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._sums, op=dist.ReduceOp.SUM)

    @property
    def nats(self) -> float:
        return float(self._sums[0].item())

    @property
    def tokens(self) -> int:
        return round(float(self._sums[1].item()))

    @property
    def bytes(self) -> int:
        return round(float(self._sums[2].item()))

    @property
    def loss(self) -> float:
        """Mean nats per scored token (NaN when empty)."""
        nats, toks, _ = self._sums.tolist()
        return nats / toks if toks > 0 else float("nan")

    @property
    def bpb(self) -> float:
        """(nats / ln 2) / bytes."""
        nats, _, byts = self._sums.tolist()
        return bpb(nats, byts)

    def as_dict(self) -> dict[str, float | int]:
        nats, toks, byts = self._sums.tolist()
        return {
            "loss": nats / toks if toks > 0 else float("nan"),
            "bpb": bpb(nats, byts),
            "nats": nats,
            "tokens": round(toks),
            "bytes": round(byts),
        }


@dataclass
class ByteCountReport:
    """How the bytes counted by the tables relate to a corpus's text.

    raw_bytes: UTF-8 bytes of the texts as given.
    normalized_bytes: UTF-8 bytes after the tokenizer's normaliser (sp.normalize).
    counted_bytes: bytes the tables count for the BOS-prefixed encoded docs.
    docs_with_unk / unk_tokens: docs holding <unk> pieces, and how many.
    mismatched_docs: indices of docs without <unk> whose count differs from their
        normalised text (empty when the tables are right).
    """

    docs: int
    tokens: int
    raw_bytes: int
    normalized_bytes: int
    counted_bytes: int
    docs_with_unk: int
    unk_tokens: int
    docs_equal_raw: int
    mismatched_docs: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched_docs


def byte_count_report(
    model: str | Path | Any,
    texts: Iterable[str],
    tables: ByteTables | None = None,
    bos_id: int | None = None,
) -> ByteCountReport:
    """Encode `texts` as BOS-prefixed docs and compare counted bytes with the text.

    Uses the tokenizer's own normaliser (``sp.normalize``) for the reference text, so
    whitespace folding and NFKC do not show up as errors; docs with <unk> pieces lose the
    unknown characters (0 bytes) and are reported separately.
    """
    sp = load_sentencepiece(model)
    if tables is None:
        tables = ByteTables.from_sentencepiece(sp)
    tables = tables.to("cpu")
    bos = sp.bos_id() if bos_id is None else bos_id
    if bos < 0:
        raise ValueError("the tokenizer has no BOS id; pass bos_id")
    unk = sp.unk_id()
    # With add_dummy_prefix the normaliser prepends "▁"; that space follows BOS and is
    # not text, so it is dropped from the reference.
    dummy_prefix = sp.normalize("x").startswith(SPACE_MARK)
    texts = list(texts)
    encoded = sp.encode(texts)
    per_doc = doc_bytes(tables, encoded, bos)
    rep = ByteCountReport(0, 0, 0, 0, 0, 0, 0, 0)
    for i, (text, ids, counted) in enumerate(zip(texts, encoded, per_doc)):
        raw = len(text.encode("utf-8"))
        norm_text = sp.normalize(text)
        if dummy_prefix and norm_text.startswith(SPACE_MARK):
            norm_text = norm_text[len(SPACE_MARK) :]
        norm = len(norm_text.replace(SPACE_MARK, " ").encode("utf-8"))
        n_unk = sum(1 for t in ids if t == unk)
        rep.docs += 1
        rep.tokens += len(ids) + 1
        rep.raw_bytes += raw
        rep.normalized_bytes += norm
        rep.counted_bytes += counted
        rep.docs_equal_raw += int(counted == raw)
        if n_unk:
            rep.docs_with_unk += 1
            rep.unk_tokens += n_unk
        elif counted != norm:
            rep.mismatched_docs.append(i)
    return rep
