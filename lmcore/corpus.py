"""Building token shards from documents (SPEC.md section 1): reading a `.jsonl[.xz|.gz]`
file of documents, tokenizing it into a shard folder, and `lmcore data build`.

Documents: one JSON object a line with a string "text"; blank lines are skipped. Bad
input (a missing or unloadable tokenizer, a line that is not UTF-8 or not such an object,
a truncated or corrupt compressed file) raises `lmcore.errors.InputError` (or
`InputNotFound`) naming the file and, for a line, its number.

Building: each document becomes [BOS] + its SentencePiece ids (no EOS). The first
`val_docs` documents form the `fineweb_val_NNNNNN.bin` stream, the rest the
`fineweb_train_NNNNNN.bin` stream; each stream is cut into files of at most
`shard_tokens` tokens (the format: `lmcore.data`). Tokenization runs on every core, in
document order. No documents, or no train documents left after `val_docs`, is an error.
A build is written into a temporary folder inside the output folder and moved into place
only once it succeeded (build.json last): a failed build leaves the output as it was.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmcore.bpb import load_sentencepiece
from lmcore.data import MAX_TOKEN_ID, SHARD_PATTERNS, PathLike, shard_name, write_shard
from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_json

# ---------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _parse_line(path: Path, lineno: int, raw: bytes) -> str | None:
    """The "text" of one JSON line (None for a blank line); InputError naming the line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
        raise InputError(f"{path}: line {lineno}: not valid UTF-8 ({bad})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise InputError(f'{path}: line {lineno}: expected an object with a string "text"')
    return obj["text"]


def iter_docs(path: PathLike) -> Iterator[str]:
    """Yield the "text" field of each line of a `.jsonl` / `.jsonl.xz` (or `.gz`) file.

    Blank lines are skipped. A missing file raises `InputNotFound`; a line that is not
    UTF-8, or not a JSON object with a string "text", and a compressed file that is
    truncated or corrupt raise `InputError` naming the file and the 1-based line number.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: documents file not found")
    return _read_docs(p)


def _read_docs(p: Path) -> Iterator[str]:
    lineno = 0
    try:
        with _open_binary(p) as f:
            for lineno, raw in enumerate(f, start=1):
                text = _parse_line(p, lineno, raw)
                if text is not None:
                    yield text
    except (OSError, EOFError, lzma.LZMAError) as e:  # truncated/corrupt .xz or .gz, a read error
        raise InputError(f"{p}: cannot read past line {lineno}, a truncated or corrupt file? ({e})") from None


# ---------------------------------------------------------------------------------------
# Building shards
# ---------------------------------------------------------------------------------------

_BATCH_DOCS = 128  # documents per tokenization task
_worker_sp: Any = None  # the SentencePiece model of a pool worker (loaded once)


def _encode(sp: Any, texts: list[str]) -> np.ndarray:
    """[BOS] + ids for every text, concatenated, as uint16."""
    bos = sp.bos_id()
    ids = sp.encode(texts, out_type=int, num_threads=1)
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos] = bos
        out[pos + 1 : pos + 1 + len(x)] = x
        pos += len(x) + 1
    return out


def _worker_init(model_path: str) -> None:
    global _worker_sp
    _worker_sp = load_sentencepiece(model_path)


def _worker_encode(texts: list[str]) -> np.ndarray:
    return _encode(_worker_sp, texts)


def _batches(docs: Iterable[str], val_docs: int) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) batches in document order; no batch straddles the val/train cut."""
    batch: list[str] = []
    split = "val"
    for n, text in enumerate(docs):
        if n == val_docs:
            if batch:
                yield split, batch
                batch = []
            split = "train"
        batch.append(text)
        if len(batch) >= _BATCH_DOCS:
            yield split, batch
            batch = []
    if batch:
        yield split, batch


class _SplitWriter:
    """Buffers one split's token stream and writes it as files of `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.files: list[str] = []

    def add(self, arr: np.ndarray) -> None:
        self.buf.append(arr)
        self.buffered += arr.size
        self.tokens += arr.size
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        name = shard_name(self.split, len(self.files))
        write_shard(self.out_dir / name, data[:n])
        self.files.append(name)
        rest = data[n:]
        self.buf = [rest] if rest.size else []
        self.buffered = int(rest.size)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


def _existing_shards(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return sorted(p for pat in SHARD_PATTERNS.values() for p in out_dir.glob(pat))


def _tokenize(
    doc_iter: Iterable[str], tok_path: Path, sp: Any, val_docs: int, writers: dict[str, _SplitWriter],
    nproc: int, progress: bool,
) -> int:  # fmt: skip
    """Encode the documents into the split writers, in document order; return the doc count."""
    from tqdm import tqdm

    n_docs = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)

    def consume(split: str, n: int, arr: np.ndarray) -> None:
        nonlocal n_docs
        if split == "train" and writers["val"].buffered:
            writers["val"].close()  # the val stream is complete: free its buffer
        writers[split].add(arr)
        n_docs += n
        bar.update(n)
        bar.set_postfix(tokens=writers["val"].tokens + writers["train"].tokens, refresh=False)

    try:
        if nproc <= 1:
            for split, texts in _batches(doc_iter, val_docs):
                consume(split, len(texts), _encode(sp, texts))
        else:
            with mp.get_context().Pool(nproc, _worker_init, (str(tok_path),)) as pool:
                pending: deque[tuple[str, int, Any]] = deque()
                for split, texts in _batches(doc_iter, val_docs):
                    pending.append((split, len(texts), pool.apply_async(_worker_encode, (texts,))))
                    if len(pending) >= 4 * nproc:
                        s, n, res = pending.popleft()
                        consume(s, n, res.get())
                while pending:
                    s, n, res = pending.popleft()
                    consume(s, n, res.get())
        for w in writers.values():
            w.close()
    finally:
        bar.close()
    return n_docs


def _commit(tmp: Path, out: Path, names: list[str], old: list[Path]) -> None:
    """Move a finished build from `tmp` into `out`: the old build.json goes first (so a
    crash within these few renames leaves a folder marked unfinished by its absence), then
    the new shards replace the old ones, old shards not rewritten are removed, and the new
    build.json comes last."""
    (out / "build.json").unlink(missing_ok=True)
    for name in names:
        os.replace(tmp / name, out / name)
    for stale in old:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    os.replace(tmp / "build.json", out / "build.json")


def build_shards(
    docs: PathLike | Iterable[str],
    tokenizer: PathLike,
    out_dir: PathLike,
    val_docs: int,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    require_train: bool = True,
) -> dict[str, int]:
    """Tokenize documents into val and train shards in `out_dir`.

    `docs` is a `.jsonl[.xz]` path (see `iter_docs`) or an iterable of texts. Each doc
    becomes [BOS] + SentencePiece ids; the first `val_docs` docs form the val stream, the
    rest the train stream, each cut into files of at most `shard_tokens` tokens.
    `val_docs=0` gives a train split alone; with `require_train` (the default) `val_docs`
    must be smaller than the number of documents, else the build is refused (False allows
    a val-only folder). No documents at all is an error.
    Tokenization uses `workers` processes (None: all cores; <= 1: this process), each
    loading the model once; results are consumed in document order with a bounded number
    of batches in flight, so memory stays flat on any corpus size.

    The build is written into a temporary folder inside `out_dir` and moved into place
    only once it succeeded, `build.json` (counts and inputs) last; a failed or interrupted
    build leaves `out_dir` as it was. An `out_dir` that already holds shards is refused
    unless `overwrite`; then the old shards this build did not rewrite are removed, and
    other files in `out_dir` are kept. Bad input raises `InputError` / `InputNotFound`.
    Returns {"val_tokens", "train_tokens", "val_files", "train_files", "docs"}.
    """
    if val_docs < 0:
        raise InputError(f"--val-docs must be >= 0, got {val_docs}")
    if shard_tokens <= 0:
        raise InputError(f"--shard-tokens must be > 0, got {shard_tokens}")
    tok_path = Path(tokenizer)
    sp = load_sentencepiece(tok_path)
    vocab, bos = int(sp.vocab_size()), int(sp.bos_id())
    if vocab > MAX_TOKEN_ID + 1:
        raise InputError(f"{tok_path}: vocab size {vocab} does not fit uint16 shards")
    if not 0 <= bos < vocab:
        raise InputError(f"{tok_path}: tokenizer has no valid BOS piece (bos_id={bos})")
    docs_path: Path | None = None
    if isinstance(docs, (str, os.PathLike)):
        docs_path = Path(docs)
        doc_iter: Iterable[str] = iter_docs(docs_path)
    else:
        doc_iter = docs
    docs_label = str(docs_path) if docs_path else "the documents given"

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: the output is not a folder")
    old = _existing_shards(out)
    if old and not overwrite:
        raise InputError(
            f"{out}: already holds {len(old)} shard files (e.g. {old[0].name}); "
            "remove them, choose another output folder, or pass overwrite"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lmcore-build-", dir=out))
    try:
        nproc = (os.cpu_count() or 1) if workers is None else int(workers)
        writers = {s: _SplitWriter(tmp, s, shard_tokens) for s in ("val", "train")}
        n_docs = _tokenize(doc_iter, tok_path, sp, val_docs, writers, nproc, progress)
        if n_docs == 0:
            raise InputError(f'{docs_label}: no documents (expected JSON lines with a "text")')
        if require_train and n_docs <= val_docs:
            raise InputError(
                f"--val-docs {val_docs} leaves no train documents: {docs_label} holds {n_docs} documents"
            )
        counts = {
            "val_tokens": writers["val"].tokens,
            "train_tokens": writers["train"].tokens,
            "val_files": len(writers["val"].files),
            "train_files": len(writers["train"].files),
            "docs": n_docs,
        }
        atomic_write_json(
            tmp / "build.json",
            {
                **counts,
                "docs_path": str(docs_path.resolve()) if docs_path else None,
                "tokenizer": str(tok_path.resolve()),
                "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
                "val_docs": val_docs,
                "shard_tokens": shard_tokens,
                "bos_id": bos,
                "vocab_size": vocab,
                "files": {s: w.files for s, w in writers.items()},
            },
        )
        _commit(tmp, out, [f for w in writers.values() for f in w.files], old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return counts



def _cmd_build(args: argparse.Namespace) -> int:
    counts = build_shards(
        args.docs,
        args.tokenizer,
        args.out,
        val_docs=args.val_docs,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(json.dumps(counts, indent=2))
    return 0


def add_build_parser(sub: Any) -> None:
    """Add `build` to the subparsers of `lmcore data`."""
    b = sub.add_parser(
        "build",
        help="tokenize a .jsonl[.xz] of documents into val/train shards",
        description="Each doc becomes [BOS] + SentencePiece ids; the first --val-docs docs "
        "form fineweb_val_*.bin, the rest fineweb_train_*.bin. Prints the counts as JSON.",
    )
    b.add_argument("--docs", required=True, help='documents: JSON lines with a "text" field (.jsonl or .jsonl.xz)')
    b.add_argument("--tokenizer", required=True, help="SentencePiece model file (.model)")
    b.add_argument("--out", required=True, help="output folder for the shards and build.json")
    b.add_argument(
        "--val-docs",
        type=int,
        required=True,
        help="number of leading documents that form the validation split "
        "(0: none; it must leave at least one train document)",
    )
    b.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="maximum tokens per shard file (default: 100,000,000)"
    )
    b.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores; 1 = no subprocesses)"
    )
    b.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards already in --out once the new build succeeded (stale ones are removed)",
    )
    b.set_defaults(func=_cmd_build)
