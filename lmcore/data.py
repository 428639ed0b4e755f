"""Token shards: the challenge's binary format, checking a shard folder, and the training /
validation loaders (SPEC.md section 1). Building shards from documents: `lmcore.corpus`.

Shard file: 256 little-endian int32 header words [MAGIC, VERSION, num_tokens, 0, ...]
followed by num_tokens little-endian uint16 token ids. Every reader validates magic,
version and file size, and a bad file raises `ShardError` naming the file and the fault.

Token ids must also be below the vocabulary size: `check_dir` (`lmcore data check`)
checks every id against `--vocab-size`, else the folder's build.json "vocab_size" (the
piece count of the tokenizer it was built with), else the challenge's 1024; the loaders
check every shard they read once, when given `vocab_size`.

Training loader: one contiguous stream over the sorted train shards, wrapping around;
each step takes a chunk of world_size spans of (local_tokens + 1) tokens and every rank
keeps its own span (x = span[:-1], y = span[1:]). Shards are memory-mapped one at a time,
and the stream position can be saved and restored for exact resumption.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.errors import InputError
from lmcore.runs import atomic_write_bytes

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
TOKEN_BYTES = 2
MAX_TOKEN_ID = 65535

DEFAULT_VOCAB_SIZE = 1024  # the challenge's tokenizer
_CHECK_CHUNK = 1 << 24  # tokens scanned at a time by check_token_ids

TRAIN_PATTERN = "fineweb_train_*.bin"
VAL_PATTERN = "fineweb_val_*.bin"
SHARD_PATTERNS = {"val": VAL_PATTERN, "train": TRAIN_PATTERN}

PathLike = str | os.PathLike[str]


class ShardError(InputError):
    """A shard file or shard folder is invalid; the message names the file and the fault."""


# ---------------------------------------------------------------------------------------
# Shard format
# ---------------------------------------------------------------------------------------


def shard_nbytes(num_tokens: int) -> int:
    """Size in bytes of a valid shard holding `num_tokens` tokens."""
    return HEADER_BYTES + TOKEN_BYTES * int(num_tokens)


def shard_name(split: str, index: int) -> str:
    """`fineweb_{split}_{index:06d}.bin`."""
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: PathLike, tokens: Any) -> int:
    """Write `tokens` (1-D integer ids in [0, 65535]) as a shard, atomically.

    Returns the number of tokens written. Raises ValueError for ids out of range.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{path}: token id {bad} does not fit in uint16 (0..{MAX_TOKEN_ID})")
    if arr.size >= 2**31:
        raise ValueError(f"{path}: {arr.size} tokens do not fit one shard (int32 count)")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    atomic_write_bytes(path, header.tobytes() + arr.astype("<u2", copy=False).tobytes())
    return int(arr.size)


def read_header(path: PathLike) -> int:
    """Validate a shard's header and size; return its number of tokens.

    Raises ShardError naming the file for: a missing file, a short header, a bad magic,
    a bad version, a negative count, or a size that disagrees with the header.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{p}: no such shard file") from None
    except IsADirectoryError:
        raise ShardError(f"{p}: is a directory, not a shard file") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{p}: truncated header: file has {size} bytes, a shard header needs {HEADER_BYTES}")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise ShardError(f"{p}: bad magic {magic} (expected {MAGIC}); not a token shard")
    if version != VERSION:
        raise ShardError(f"{p}: bad version {version} (expected {VERSION})")
    if num_tokens < 0:
        raise ShardError(f"{p}: bad token count {num_tokens} in header")
    expected = shard_nbytes(num_tokens)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(
            f"{p}: size {size} bytes but header says {num_tokens} tokens => expected {expected} bytes ({what})"
        )
    return num_tokens


def read_shard(path: PathLike) -> np.ndarray:
    """Return a validated shard's tokens as a read-only uint16 array (memory-mapped)."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    mm = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    return mm if mm.dtype == np.uint16 else np.asarray(mm, dtype=np.uint16)


def _dir_or_error(data_dir: PathLike) -> Path:
    d = Path(data_dir)
    if not d.exists():
        raise ShardError(f"{d}: missing directory")
    if not d.is_dir():
        raise ShardError(f"{d}: not a directory")
    return d


def list_shards(data_dir: PathLike, pattern: str) -> list[Path]:
    """Sorted shard files in `data_dir` matching `pattern`; ShardError if there are none."""
    d = _dir_or_error(data_dir)
    files = sorted(p for p in d.glob(pattern) if p.is_file())
    if not files:
        raise ShardError(f"{d}: no shards matching {pattern}")
    return files


def check_token_ids(path: PathLike, tokens: np.ndarray, vocab_size: int, source: str = "") -> None:
    """Raise ShardError naming `path`, the first id >= `vocab_size`, its position and the
    vocabulary size (and `source`, where that size came from) if `tokens` holds one."""
    for start in range(0, tokens.size, _CHECK_CHUNK):
        part = tokens[start : start + _CHECK_CHUNK]
        if int(part.max()) >= vocab_size:
            i = int(np.argmax(part >= vocab_size))
            where = f" ({source})" if source else ""
            raise ShardError(
                f"{path}: token id {int(part[i])} at position {start + i} is outside "
                f"the vocabulary of {vocab_size} ids{where}"
            )


def folder_vocab_size(data_dir: PathLike) -> tuple[int, str]:
    """(vocabulary size, where it came from) of a shard folder: the "vocab_size" of its
    build.json (the tokenizer's piece count), else the challenge's 1024.

    A build.json that is not JSON, or whose "vocab_size" is not an integer in 1..65536,
    raises InputError naming it.
    """
    meta = Path(data_dir) / "build.json"
    if not meta.is_file():
        return DEFAULT_VOCAB_SIZE, f"the default; no {meta.name}"
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or "vocab_size" not in info:
        return DEFAULT_VOCAB_SIZE, f"the default; no vocab_size in {meta}"
    v = info["vocab_size"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TOKEN_ID + 1:
        raise InputError(f"{meta}: vocab_size must be an integer in 1..{MAX_TOKEN_ID + 1}, got {v!r}")
    return v, f"vocab_size of {meta}"


def check_dir(data_dir: PathLike, vocab_size: int | None = None) -> dict[str, Any]:
    """Validate every val and train shard of a folder (read-only); return token counts.

    Headers and sizes are checked first, then every token id against `vocab_size` (None:
    `folder_vocab_size`). Returns {"dir", "vocab_size", "vocab_from", "val": {"files": n,
    "tokens": N}, "train": {...}}. Raises ShardError at the first bad file (val shards
    first, each split in sorted order), or for a missing folder or a split without any
    shard; InputError for a vocabulary size outside 1..65536.
    """
    d = _dir_or_error(data_dir)
    if vocab_size is None:
        vocab_size, source = folder_vocab_size(d)
    elif not 1 <= vocab_size <= MAX_TOKEN_ID + 1:
        raise InputError(f"--vocab-size must be in 1..{MAX_TOKEN_ID + 1}, got {vocab_size}")
    else:
        source = "--vocab-size"
    out: dict[str, Any] = {"dir": str(d), "vocab_size": vocab_size, "vocab_from": source}
    files = {split: list_shards(d, pattern) for split, pattern in SHARD_PATTERNS.items()}
    for split, names in files.items():
        out[split] = {"files": len(names), "tokens": sum(read_header(f) for f in names)}
    for names in files.values():
        for f in names:
            check_token_ids(f, read_shard(f), vocab_size, source)
    return out


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


class TokenStream:
    """One contiguous token stream over `files` (in the given order), wrapping around.

    Only the shard being read is memory-mapped; headers of all files are validated up
    front, and with `vocab_size` every shard's ids once, when it is first mapped. The
    position is (file index, offset in that file): see `state_dict`.
    """

    def __init__(self, files: Sequence[PathLike], vocab_size: int | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.vocab_size = vocab_size
        self._checked: set[int] = set()
        if not self.files:
            raise ShardError("TokenStream: no shard files given")
        self.sizes = [read_header(f) for f in self.files]
        if sum(self.sizes) == 0:
            raise ShardError(f"{self.files[0].parent}: all {len(self.files)} shards are empty")
        self.file_idx = 0
        self.pos = 0
        self._loaded_idx = -1
        self._tokens: np.ndarray | None = None

    def _current(self) -> np.ndarray:
        if self._loaded_idx != self.file_idx:
            self._tokens = None  # drop the previous mapping before opening the next
            self._tokens = read_shard(self.files[self.file_idx])
            self._loaded_idx = self.file_idx
            if self.vocab_size is not None and self.file_idx not in self._checked:
                check_token_ids(self.files[self.file_idx], self._tokens, self.vocab_size)
                self._checked.add(self.file_idx)
        assert self._tokens is not None
        return self._tokens

    def _move(self, n: int, out: np.ndarray | None) -> None:
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        done = 0
        while done < n:
            avail = self.sizes[self.file_idx] - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.pos = 0
                continue
            k = min(n - done, avail)
            if out is not None:
                out[done : done + k] = self._current()[self.pos : self.pos + k]
            self.pos += k
            done += k

    def take(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next `n` tokens of the stream: a uint16 copy, or written into `out` (n elements of an
        integer dtype, such as a pinned host buffer's view), which is returned."""
        if out is None:
            out = np.empty(n, dtype=np.uint16)
        elif out.shape != (n,):
            raise ValueError(f"take({n}): out has shape {out.shape}, not ({n},)")
        self._move(n, out)
        return out

    def skip(self, n: int) -> None:
        """Advance the stream by `n` tokens without reading them."""
        self._move(n, None)

    def state_dict(self) -> dict[str, Any]:
        return {"file_idx": self.file_idx, "pos": self.pos, "files": [f.name for f in self.files]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [f.name for f in self.files]
        where = self.files[0].parent
        if "files" in state and list(state["files"]) != names:
            raise InputError(
                f"{where}: the saved stream state is over {len(state['files'])} shards "
                f"({state['files'][:2]}...), this folder has {len(names)} ({names[:2]}...)"
            )
        idx, pos = int(state["file_idx"]), int(state["pos"])
        if not 0 <= idx < len(self.files) or not 0 <= pos <= self.sizes[idx]:
            raise InputError(f"{where}: saved stream state out of range: file_idx={idx}, pos={pos}")
        self.file_idx, self.pos = idx, pos


class DistributedTokenLoader:
    """Per-rank batches from the sorted train shards of `data_dir` (SPEC.md section 1).

    Every micro-batch advances the shared stream by world_size * (local_tokens + 1) tokens,
    the same on every rank; `next_batch` returns this rank's span of one as int64 CPU tensors,
    `next_step` the spans of a step's micro-batches as the rows of one array. With
    `vocab_size`, a shard holding an id >= vocab_size raises ShardError when first read.
    """

    def __init__(
        self,
        data_dir: PathLike,
        pattern: str = TRAIN_PATTERN,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(list_shards(data_dir, pattern), vocab_size)

    def step_shape(self, global_tokens: int, seq_len: int, grad_accum: int = 1) -> tuple[int, int]:
        """(grad_accum, tokens per micro-batch + 1): the rows `next_step` returns for this rank."""
        local = global_tokens // (self.world_size * grad_accum)
        if seq_len <= 0 or local <= 0 or local % seq_len:
            raise ValueError(
                f"{global_tokens} tokens over {self.world_size} ranks x {grad_accum} micro-batches "
                f"gives {local} tokens per micro-batch, not a positive multiple of seq_len {seq_len}"
            )
        return grad_accum, local + 1

    def _own_span(self, span: int, out: np.ndarray | None = None) -> np.ndarray:
        self.stream.skip(self.rank * span)
        t = self.stream.take(span, out)
        self.stream.skip((self.world_size - self.rank - 1) * span)
        return t

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        _, span = self.step_shape(global_tokens, seq_len, grad_accum)
        t = torch.from_numpy(self._own_span(span).astype(np.int64))
        return t[:-1].reshape(-1, seq_len), t[1:].reshape(-1, seq_len)

    def next_step(
        self, global_tokens: int, seq_len: int, grad_accum: int = 1, out: np.ndarray | None = None
    ) -> np.ndarray:
        """A whole step's micro-batches for this rank at once: row m holds what the m-th of
        `grad_accum` next_batch calls returns (x = row[:-1], y = row[1:], each reshaped to seq_len
        columns), and the stream moves as those calls move it. `out`: an integer array of
        `step_shape` to write into (a pinned host buffer's view: train.step_batch_copy), else a
        new int32 one."""
        shape = self.step_shape(global_tokens, seq_len, grad_accum)
        if out is None:
            out = np.empty(shape, dtype=np.int32)
        elif out.shape != shape:
            raise ValueError(f"next_step: out has shape {out.shape}, not {shape}")
        for row in out:
            self._own_span(shape[1], row)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def load_val_tokens(
    data_dir: PathLike,
    pattern: str = VAL_PATTERN,
    seq_len: int = 2048,
    max_tokens: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The sorted val shards concatenated as int64, cut to ((n - 1) // seq_len) * seq_len + 1
    tokens, where n is the total (capped at `max_tokens` when > 0). With `vocab_size`, every
    shard read is checked whole: an id >= vocab_size raises ShardError naming it."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    files = list_shards(data_dir, pattern)
    parts: list[np.ndarray] = []
    n = 0
    for f in files:
        if max_tokens > 0 and n >= max_tokens:
            break
        toks = read_shard(f)
        if vocab_size is not None:
            check_token_ids(f, toks, vocab_size)
        if max_tokens > 0:
            toks = toks[: max_tokens - n]
        parts.append(np.asarray(toks, dtype=np.int64))
        n += toks.size
    usable = ((n - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"{data_dir}: validation split has {n} tokens, too short for seq_len {seq_len}")
    return torch.from_numpy(np.concatenate(parts)[: usable + 1])


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    print(json.dumps(check_dir(args.dir, args.vocab_size), indent=2))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `lmcore data build` and `lmcore data check`."""
    from lmcore.corpus import add_build_parser  # corpus imports this module

    p = subparsers.add_parser(
        "data",
        help="build token shards from documents, or check a shard folder",
        description="Token shards in the challenge format (256 int32 header words + uint16 ids).",
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    add_build_parser(sub)

    c = sub.add_parser(
        "check",
        help="validate every shard of a folder and print token counts per split",
        description="Reads every fineweb_val_*.bin and fineweb_train_*.bin header and size, "
        "then checks that every token id is below the vocabulary size (nothing is modified); "
        "a bad file is named and the exit status is 2.",
    )
    c.add_argument("dir", help="folder holding fineweb_{val,train}_*.bin shards")
    c.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size the ids must be below (default: the folder's build.json "
        f"vocab_size, else {DEFAULT_VOCAB_SIZE})",
    )
    c.set_defaults(func=_cmd_check)
