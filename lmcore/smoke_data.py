"""The smoke corpus: a small dataset built offline from text that ships with Python.

`ensure_smoke_data(data_dir, tokenizer_path)` collects documents from the Python
installation itself (the `pydoc_data.topics` help topics, and the docstrings of standard
library modules, read with `ast` from their source files, nothing imported), shuffles
them with a fixed seed, trains a 1,024-piece SentencePiece BPE tokenizer on them
(bos_id=1, no EOS, unk_id=0, byte fallback, one thread: deterministic) and writes
challenge-format shards with `lmcore.corpus.build_shards` (each doc is [BOS] + ids; the
first 5% of the docs are the validation split). It needs no network and no ../shared,
so `lmcore train --preset smoke` works on a fresh clone.

It is idempotent: a folder whose `smoke.json` marker matches this builder's version and
whose tokenizer and shards are valid is left alone.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path
from typing import Any

from lmcore.runs import atomic_write_json

SMOKE_VERSION = 1
VOCAB_SIZE = 1024
VAL_FRACTION = 0.05
MAX_CHARS = 2_500_000  # total text collected (a few MB at most)
SEED = 1234
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}

__all__ = ["ensure_smoke_data", "smoke_documents", "train_tokenizer"]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []

    def walk(d: Path) -> None:
        try:
            entries = sorted(d.iterdir(), key=lambda p: p.name)
        except OSError:
            return
        for e in entries:
            if e.is_dir() and not e.is_symlink():
                if e.name not in _SKIP_DIRS and not e.name.startswith("."):
                    walk(e)
            elif e.suffix == ".py" and e.is_file():
                out.append(e)

    walk(root)
    return out


def _module_doc(path: Path) -> str | None:
    """Module, class and function docstrings of one source file, joined (None if none)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                parts.append(doc.strip())
    return "\n\n".join(parts) if parts else None


def smoke_documents(max_chars: int = MAX_CHARS) -> list[str]:
    """The smoke corpus's documents, in their final (seeded, shuffled) order.

    Help topics first, then one document per standard-library module (docstrings), until
    `max_chars` characters; then a fixed-seed shuffle.
    """
    from pydoc_data import topics

    docs: list[str] = [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]
    total = sum(len(d) for d in docs)
    for f in _stdlib_files():
        if total >= max_chars:
            break
        d = _module_doc(f)
        if d:
            docs.append(d)
            total += len(d)
    random.Random(SEED).shuffle(docs)
    return docs


def train_tokenizer(docs: list[str], model_path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a SentencePiece BPE model on `docs` and write it to `model_path`, atomically."""
    import sentencepiece as spm

    from lmcore.runs import atomic_write_bytes

    spm.set_random_generator_seed(SEED)
    # sentences = lines; long lines are skipped by sentencepiece, so cut them
    lines = [ln[:4000] for d in docs for ln in d.splitlines() if ln.strip()]
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=-1,
        pad_id=-1,
        num_threads=1,
        split_digits=True,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=8192,
        minloglevel=2,
    )
    atomic_write_bytes(model_path, buf.getvalue())


def _valid(data_dir: Path, tokenizer_path: Path) -> bool:
    from lmcore.data import ShardError, check_dir

    marker = data_dir / "smoke.json"
    if not (marker.is_file() and tokenizer_path.is_file() and (data_dir / "build.json").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
        if info.get("version") != SMOKE_VERSION:
            return False
        if info.get("tokenizer_sha256") != hashlib.sha256(tokenizer_path.read_bytes()).hexdigest():
            return False
        check_dir(data_dir)
    except (ValueError, ShardError, OSError):
        return False
    return True


def ensure_smoke_data(data_dir: str | Path, tokenizer_path: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build the smoke corpus (tokenizer + shards) in `data_dir` unless it is there already.

    Returns the `smoke.json` marker: version, docs, val_docs, token counts, tokenizer
    hash, Python version, and "built": whether this call built it.
    """
    data_dir, tokenizer_path = Path(data_dir), Path(tokenizer_path)
    if _valid(data_dir, tokenizer_path):
        info = json.loads((data_dir / "smoke.json").read_text())
        info["built"] = False
        return info
    from lmcore.corpus import build_shards

    if progress:
        print(f"building the smoke corpus in {data_dir} (from Python's own documentation)", flush=True)
    docs = smoke_documents()
    data_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(docs, tokenizer_path)
    val_docs = max(1, int(len(docs) * VAL_FRACTION))
    counts = build_shards(
        docs,
        tokenizer_path,
        data_dir,
        val_docs=val_docs,
        shard_tokens=1 << 20,
        workers=1,
        progress=progress,
        overwrite=True,
    )
    info = {
        "version": SMOKE_VERSION,
        "docs": len(docs),
        "val_docs": val_docs,
        "chars": sum(len(d) for d in docs),
        "val_tokens": counts["val_tokens"],
        "train_tokens": counts["train_tokens"],
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
        "python": sys.version.split()[0],
    }
    atomic_write_json(data_dir / "smoke.json", info)
    info["built"] = True
    return info
