"""Tests for lmcore.data and lmcore.corpus: shard format, folder check (CLI), document
reading, shard building with a tiny SentencePiece model, the training loader and the val
loader."""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcore import cli, corpus, data
from lmcore.corpus import build_shards, iter_docs
from lmcore.errors import InputError, InputNotFound
from lmcore.data import (
    HEADER_BYTES,
    MAGIC,
    DistributedTokenLoader,
    ShardError,
    TokenStream,
    check_dir,
    load_val_tokens,
    read_header,
    read_shard,
    write_shard,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"

_WORD_TEXT = (
    "the of and a to in is was that for on with as by at from his her it an were are "
    "which this be or had not but have they one their you all its so no if has more "
    "python linux kernel file process memory thread river castle winter garden letter "
    "naïve café résumé 東京 — “quoted” 42 3.14 x=y+1"
)
WORDS = _WORD_TEXT.split()


def _doc(rng: random.Random) -> str:
    n = rng.randint(0, 40)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + ("\n" if rng.random() < 0.3 else "")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [_doc(rng) for _ in range(300)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text("\n".join(t for t in texts if t.strip()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"),
        model_prefix=str(d / "tiny"),
        vocab_size=96,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    return d / "tiny.model"


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(lines.encode("utf-8")))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def _expected_stream(sp_model: Path, texts: list[str]) -> list[np.ndarray]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return [np.array([1] + sp.encode(t), dtype=np.uint16) for t in texts]


def _make_dir(d: Path, val: list[np.ndarray], train: list[np.ndarray]) -> Path:
    for i, t in enumerate(val):
        write_shard(d / f"fineweb_val_{i:06d}.bin", t)
    for i, t in enumerate(train):
        write_shard(d / f"fineweb_train_{i:06d}.bin", t)
    return d


def _build_argv(docs: Path, tokenizer: Path, out: Path, val_docs: int = 5, *extra: str, workers: int = 1) -> list[str]:
    """`lmcore data build` arguments."""
    return ["data", "build", "--docs", str(docs), "--tokenizer", str(tokenizer), "--out", str(out),
            "--val-docs", str(val_docs), "--workers", str(workers), "--no-progress", *extra]  # fmt: skip


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, checked to be one line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------
# Shard format


def test_write_read_round_trip(tmp_path: Path) -> None:
    toks = np.array([0, 1, 2, 1023, 65535, 7], dtype=np.int64)
    p = tmp_path / "s.bin"
    assert write_shard(p, toks) == 6
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * 6
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [MAGIC, 1, 6] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == toks.tolist()
    assert read_header(p) == 6
    got = read_shard(p)
    assert got.dtype == np.uint16 and got.tolist() == toks.tolist()
    # lists, torch tensors and empty shards work too
    write_shard(tmp_path / "l.bin", [5, 6])
    assert read_shard(tmp_path / "l.bin").tolist() == [5, 6]
    write_shard(tmp_path / "t.bin", torch.tensor([9, 8], dtype=torch.int64))
    assert read_shard(tmp_path / "t.bin").tolist() == [9, 8]
    write_shard(tmp_path / "e.bin", [])
    assert read_header(tmp_path / "e.bin") == 0 and read_shard(tmp_path / "e.bin").size == 0
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_shard_rejects_ids_out_of_range(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        write_shard(tmp_path / "s.bin", [1, bad, 2])
    assert not (tmp_path / "s.bin").exists()


def test_check_dir_accepts_a_good_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_dir(tmp_path, [np.arange(10)], [np.arange(100), np.arange(50)])
    (tmp_path / "build.json").write_text("{}")  # other files are ignored
    res = check_dir(tmp_path)
    assert res == {
        "dir": str(tmp_path),
        "vocab_size": 1024,
        "vocab_from": f"the default; no vocab_size in {tmp_path / 'build.json'}",
        "val": {"files": 1, "tokens": 10},
        "train": {"files": 2, "tokens": 150},
    }
    assert cli.main(["data", "check", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == {"files": 2, "tokens": 150} and out["val"]["tokens"] == 10


def _corrupt(kind: str, p: Path) -> None:
    raw = bytearray(p.read_bytes())
    if kind == "truncated":
        p.write_bytes(bytes(raw[:-3]))
    elif kind == "short_header":
        p.write_bytes(bytes(raw[:100]))
    elif kind == "magic":
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
        p.write_bytes(bytes(raw))
    elif kind == "version":
        raw[4:8] = np.array([2], dtype="<i4").tobytes()
        p.write_bytes(bytes(raw))
    elif kind == "size_mismatch":
        raw[8:12] = np.array([1000], dtype="<i4").tobytes()
        p.write_bytes(bytes(raw))
    elif kind == "trailing":
        p.write_bytes(bytes(raw) + b"\0\0")


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("truncated", "truncated"),
        ("short_header", "truncated header"),
        ("magic", "bad magic 12345"),
        ("version", "bad version 2"),
        ("size_mismatch", "header says 1000 tokens"),
        ("trailing", "trailing bytes"),
    ],
)
def test_check_rejects_bad_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, needle: str) -> None:
    _make_dir(tmp_path, [np.arange(10)], [np.arange(100), np.arange(50), np.arange(7)])
    bad = tmp_path / "fineweb_train_000001.bin"
    _corrupt(kind, bad)
    before = bad.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and needle in err
    assert len(err.strip().splitlines()) == 1
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    with pytest.raises(ShardError, match="fineweb_train_000001.bin"):
        read_shard(bad)


def _folder_with_bad_id(d: Path, bad_id: int, pos: int) -> Path:
    """A good folder except for one id in fineweb_train_000001.bin at `pos`; returns that file."""
    train1 = np.arange(100) % 50
    train1[pos] = bad_id
    _make_dir(d, [np.arange(10)], [np.arange(100) % 50, train1, np.arange(7)])
    return d / "fineweb_train_000001.bin"


@pytest.mark.parametrize("chunk", [1 << 24, 7])  # 7: the first bad id is found across scan chunks
def test_check_rejects_ids_outside_the_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(data, "_CHECK_CHUNK", chunk)
    bad = _folder_with_bad_id(tmp_path, 1024, 37)
    before = _snapshot(tmp_path)
    # no build.json: the challenge's 1024
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    err = _one_error_line(capsys)
    assert f"{bad}: token id 1024 at position 37 is outside the vocabulary of 1024 ids (the default" in err
    # --vocab-size wins
    assert cli.main(["data", "check", str(tmp_path), "--vocab-size", "1025"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 1025
    assert cli.main(["data", "check", str(tmp_path), "--vocab-size", "40"]) == 2
    assert "fineweb_train_000000.bin: token id 40 at position 40 is outside the vocabulary of 40 ids" in (
        _one_error_line(capsys)
    )
    # build.json's vocab_size (the tokenizer's piece count)
    (tmp_path / "build.json").write_text(json.dumps({"vocab_size": 2048}))
    assert cli.main(["data", "check", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vocab_size"] == 2048 and out["vocab_from"] == f"vocab_size of {tmp_path / 'build.json'}"
    (tmp_path / "build.json").write_text(json.dumps({"vocab_size": 1000}))
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    err = _one_error_line(capsys)
    assert f"{bad}: token id 1024 at position 37 is outside the vocabulary of 1000 ids (vocab_size of" in err
    (tmp_path / "build.json").unlink()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv_tail, content, needle",
    [
        (["--vocab-size", "0"], None, "--vocab-size must be in 1..65536, got 0"),
        ([], "{not json", "build.json: not valid JSON"),
        ([], '{"vocab_size": "1024"}', "build.json: vocab_size must be an integer in 1..65536, got '1024'"),
    ],
)
def test_check_bad_vocabulary_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], content: str | None, needle: str
) -> None:
    _make_dir(tmp_path, [np.arange(10)], [np.arange(100)])
    if content is not None:
        (tmp_path / "build.json").write_text(content)
    assert cli.main(["data", "check", str(tmp_path), *argv_tail]) == 2
    assert needle in _one_error_line(capsys)


def test_check_uses_the_vocabulary_of_the_build(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    import sentencepiece as spm

    build_shards(texts, sp_model, tmp_path, 10, workers=1, progress=False)
    res = check_dir(tmp_path)
    assert res["vocab_size"] == spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size() < 1024
    assert res["vocab_from"] == f"vocab_size of {tmp_path / 'build.json'}"


def test_check_missing_dir_and_missing_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "missing directory" in capsys.readouterr().err
    _make_dir(tmp_path, [np.arange(10)], [])
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    assert "no shards matching fineweb_train_*.bin" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Documents


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.xz"])
def test_iter_docs(tmp_path: Path, texts: list[str], name: str) -> None:
    p = _write_jsonl(tmp_path / name, texts[:20])
    assert list(iter_docs(p)) == texts[:20]


def test_iter_docs_malformed_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl: line 4"):
        list(iter_docs(p))
    p.write_text('{"text": "a"}\n{"title": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"line 2"):
        list(iter_docs(p))


def test_iter_docs_names_the_line_that_is_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(5000)]
    lines[2] = '{"text": "caf\u00e9"}'.encode("latin-1")  # a raw 0xe9 byte on line 3
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError, match=r"latin1\.jsonl: line 3: not valid UTF-8 \(byte 0xe9"):
        list(iter_docs(p))


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_iter_docs_damaged_xz(tmp_path: Path, texts: list[str], damage: str) -> None:
    p = _write_jsonl(tmp_path / "d.jsonl.xz", texts)
    raw = p.read_bytes()
    if damage == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    else:
        p.write_bytes(raw[:200] + bytes(b ^ 0xFF for b in raw[200:400]) + raw[400:])
    with pytest.raises(InputError, match=r"d\.jsonl\.xz: cannot read past line \d+"):
        list(iter_docs(p))


def test_iter_docs_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFound, match="nope.jsonl"):
        iter_docs(tmp_path / "nope.jsonl")  # raised at once, not at the first document


# ---------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("name, workers", [("docs.jsonl", 2), ("docs.jsonl.xz", 1)])
def test_build_shards(tmp_path: Path, sp_model: Path, texts: list[str], name: str, workers: int) -> None:
    docs = _write_jsonl(tmp_path / name, texts)
    val_docs = 40
    enc = _expected_stream(sp_model, texts)
    val = np.concatenate(enc[:val_docs])
    train = np.concatenate(enc[val_docs:])
    assert sum(len(e) for e in enc) == len(val) + len(train)
    shard_tokens = 1000
    assert len(val) > shard_tokens and len(train) > 3 * shard_tokens  # the test splits files
    out = tmp_path / "out"
    counts = build_shards(docs, sp_model, out, val_docs, shard_tokens=shard_tokens, workers=workers, progress=False)
    n_val_files = -(-len(val) // shard_tokens)
    n_train_files = -(-len(train) // shard_tokens)
    assert counts == {
        "val_tokens": len(val),
        "train_tokens": len(train),
        "val_files": n_val_files,
        "train_files": n_train_files,
        "docs": len(texts),
    }
    val_files = sorted(out.glob("fineweb_val_*.bin"))
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert [f.name for f in val_files] == [f"fineweb_val_{i:06d}.bin" for i in range(n_val_files)]
    assert len(train_files) == n_train_files
    for files, stream in ((val_files, val), (train_files, train)):
        sizes = [read_header(f) for f in files]
        assert sizes[:-1] == [shard_tokens] * (len(files) - 1) and 0 < sizes[-1] <= shard_tokens
        got = np.concatenate([read_shard(f) for f in files])
        assert np.array_equal(got, stream)
    assert read_shard(train_files[0])[0] == 1  # the train stream starts with a BOS
    meta = json.loads((out / "build.json").read_text())
    assert meta["val_tokens"] == len(val) and meta["docs_path"] == str(docs.resolve())
    assert meta["tokenizer"] == str(sp_model.resolve())
    assert check_dir(out)["train"]["tokens"] == len(train)


def test_build_shards_from_texts_and_edge_splits(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    enc = _expected_stream(sp_model, texts[:30])
    # as many val docs as docs, or more: no train split is left, an error
    for val_docs in (30, 100):
        with pytest.raises(InputError, match=f"--val-docs {val_docs} leaves no train documents: .* holds 30 documents"):
            build_shards(texts[:30], sp_model, tmp_path / "a", val_docs=val_docs, workers=1, progress=False)
        assert not (tmp_path / "a").exists()
    # unless a val-only folder is asked for
    c = build_shards(texts[:30], sp_model, tmp_path / "a", val_docs=100, workers=1, progress=False, require_train=False)
    assert c["val_tokens"] == sum(map(len, enc)) and c["train_files"] == 0 and c["docs"] == 30
    # no val docs
    c = build_shards(iter(texts[:30]), sp_model, tmp_path / "b", val_docs=0, workers=2, progress=False)
    assert c["val_files"] == 0 and c["train_tokens"] == sum(map(len, enc))
    # an exact multiple of shard_tokens gives no empty trailing file
    total = sum(map(len, enc[:10]))
    c = build_shards(texts[:10], sp_model, tmp_path / "c", val_docs=0, shard_tokens=total, workers=1, progress=False)
    assert c["train_files"] == 1


def test_build_refuses_existing_shards_unless_overwrite(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    out = tmp_path / "out"
    build_shards(texts, sp_model, out, 10, shard_tokens=500, workers=1, progress=False)
    n_before = len(list(out.glob("fineweb_train_*.bin")))
    with pytest.raises(ValueError, match="already holds"):
        build_shards(texts, sp_model, out, 10, workers=1, progress=False)
    (out / "notes.txt").write_text("mine")
    c = build_shards(texts, sp_model, out, 10, shard_tokens=10**6, workers=1, progress=False, overwrite=True)
    assert c["train_files"] == 1 and n_before > 1
    assert sorted(f.name for f in out.iterdir()) == [
        "build.json", "fineweb_train_000000.bin", "fineweb_val_000000.bin", "notes.txt"
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "build.json").read_text())["shard_tokens"] == 10**6


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every path under `d` with its bytes (None for a folder)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture()
def old_build(tmp_path: Path, sp_model: Path, texts: list[str]) -> tuple[Path, dict[str, bytes | None]]:
    """A finished build of 1,500 docs (several val and train shards) and its snapshot."""
    out = tmp_path / "out"
    c = build_shards(texts * 5, sp_model, out, 100, shard_tokens=5000, workers=1, progress=False)
    assert c["val_files"] >= 1 and c["train_files"] >= 3
    (out / "notes.txt").write_text("mine")
    return out, _snapshot(out)


@pytest.mark.parametrize("case", ["empty", "blank_lines", "no_train_docs", "malformed_line_1300"])
def test_failed_overwrite_leaves_the_old_build(
    tmp_path: Path,
    sp_model: Path,
    texts: list[str],
    old_build: tuple[Path, dict[str, bytes | None]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    out, before = old_build
    docs = tmp_path / "docs.jsonl"
    val_docs = 100
    if case == "empty":
        docs.write_bytes(b"")
        needle = f"{docs}: no documents"
    elif case == "blank_lines":
        docs.write_text("\n  \n\n", encoding="utf-8")
        needle = f"{docs}: no documents"
    elif case == "no_train_docs":
        _write_jsonl(docs, texts[:100])
        needle = f"--val-docs 100 leaves no train documents: {docs} holds 100 documents"
    else:  # fails after many shards of the new build were written
        _write_jsonl(docs, texts * 5)
        lines = docs.read_text(encoding="utf-8").splitlines(keepends=True)
        lines[1299] = '{"text": oops}\n'
        docs.write_text("".join(lines), encoding="utf-8")
        needle = f"{docs}: line 1300: not valid JSON"
    written: list[str] = []
    real_write = corpus.write_shard
    monkeypatch.setattr(corpus, "write_shard", lambda p, toks: (written.append(Path(p).name), real_write(p, toks))[1])
    argv = _build_argv(docs, sp_model, out, val_docs, "--overwrite", "--shard-tokens", "2000", workers=2)
    assert cli.main(argv) == 2
    assert needle in _one_error_line(capsys)
    assert _snapshot(out) == before  # every old file byte-identical, no temporary folder left
    if case == "malformed_line_1300":
        assert len(written) > 5 and "fineweb_val_000000.bin" in written


def test_build_that_crashes_midway_leaves_the_old_build(
    sp_model: Path, texts: list[str], old_build: tuple[Path, dict[str, bytes | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, before = old_build
    calls = []
    real_encode = corpus._encode

    def encode(sp, batch):
        calls.append(len(batch))
        if len(calls) == 6:
            raise RuntimeError("encoder crashed")
        return real_encode(sp, batch)

    monkeypatch.setattr(corpus, "_encode", encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_shards(texts * 5, sp_model, out, 100, shard_tokens=1000, workers=1, progress=False, overwrite=True)
    assert len(calls) == 6 and _snapshot(out) == before
    # a build into a new folder that fails leaves no folder behind
    with pytest.raises(InputError, match="no documents"):
        build_shards([], sp_model, out.parent / "new", 0, workers=1, progress=False)
    assert not (out.parent / "new").exists()


def test_build_cli(tmp_path: Path, sp_model: Path, texts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    docs = _write_jsonl(tmp_path / "d.jsonl.xz", texts)
    rc = cli.main(
        [
            "data",
            "build",
            "--docs",
            str(docs),
            "--tokenizer",
            str(sp_model),
            "--out",
            str(tmp_path / "o"),
            "--val-docs",
            "25",
            "--shard-tokens",
            "2000",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["docs"] == len(texts) and out["val_tokens"] == check_dir(tmp_path / "o")["val"]["tokens"]
    rc = cli.main(
        [
            "data",
            "build",
            "--docs",
            str(tmp_path / "missing.jsonl"),
            "--tokenizer",
            str(sp_model),
            "--out",
            str(tmp_path / "o2"),
            "--val-docs",
            "1",
        ]
    )
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err


def test_build_cli_bad_tokenizer(tmp_path: Path, texts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    docs = _write_jsonl(tmp_path / "d.jsonl", texts)
    garbage = tmp_path / "x.model"
    garbage.write_bytes(random.Random(1).randbytes(3000))
    assert cli.main(_build_argv(docs, garbage, tmp_path / "o")) == 2
    err = _one_error_line(capsys)
    assert f"{garbage}: not a loadable SentencePiece model" in err
    assert cli.main(_build_argv(docs, tmp_path / "missing.model", tmp_path / "o")) == 2
    assert f"{tmp_path / 'missing.model'}: SentencePiece model not found" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated_xz", "latin1"])
def test_build_cli_bad_docs_file(
    tmp_path: Path, sp_model: Path, texts: list[str], capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    if damage == "truncated_xz":
        docs = _write_jsonl(tmp_path / "d.jsonl.xz", texts)
        docs.write_bytes(docs.read_bytes()[: docs.stat().st_size // 2])
        needle = f"{docs}: cannot read past line"
    else:
        docs = _write_jsonl(tmp_path / "d.jsonl", texts)
        with open(docs, "ab") as f:
            f.write(b'{"text": "\xff"}\n')
        needle = f"{docs}: line {len(texts) + 1}: not valid UTF-8"
    assert cli.main(_build_argv(docs, sp_model, tmp_path / "o")) == 2
    assert needle in _one_error_line(capsys)


def test_build_rejects_tokenizer_without_bos(tmp_path: Path, texts: list[str]) -> None:
    import sentencepiece as spm

    (tmp_path / "t.txt").write_text("\n".join(texts[:100]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "t.txt"),
        model_prefix=str(tmp_path / "nobos"),
        vocab_size=60,
        model_type="bpe",
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    with pytest.raises(InputError, match="nobos.model: tokenizer has no valid BOS"):
        build_shards(texts, tmp_path / "nobos.model", tmp_path / "o", 1, workers=1, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "data" / "proxy_docs.jsonl.xz").is_file(), reason="../shared (proxy corpus) not present"
)
def test_proxy_corpus_counts(tmp_path: Path) -> None:
    counts = build_shards(
        SHARED / "data" / "proxy_docs.jsonl.xz",
        SHARED / "tokenizers" / "fineweb_1024_bpe.model",
        tmp_path,
        val_docs=1500,
        progress=False,
    )
    assert counts["val_tokens"] == 1_870_659
    assert counts["train_tokens"] == 32_346_615
    assert counts["docs"] == 27_365 and counts["val_files"] == 1 and counts["train_files"] == 1
    val = read_shard(tmp_path / "fineweb_val_000000.bin")
    assert val[0] == 1 and int((val == 1).sum()) >= 1500


# ---------------------------------------------------------------------------------------
# Loaders


@pytest.fixture()
def stream_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Three train shards (of unequal length, one empty) whose concatenation is 0..n-1 mod 65536."""
    sizes = [1000, 0, 1337, 613]
    full = np.arange(sum(sizes), dtype=np.int64) % 65536
    parts, start = [], 0
    for s in sizes:
        parts.append(full[start : start + s])
        start += s
    _make_dir(tmp_path, [np.arange(10)], parts)
    return tmp_path, full


def test_token_stream_wraps_around(stream_dir: tuple[Path, np.ndarray]) -> None:
    d, full = stream_dir
    ts = TokenStream(sorted(d.glob("fineweb_train_*.bin")))
    n = len(full)
    got = np.concatenate([ts.take(k) for k in (7, 1500, 993, 2000, n)])
    want = np.concatenate([full, full, full])[: len(got)]
    assert np.array_equal(got.astype(np.int64), want)
    pos = len(got) % n
    ts.skip(5)
    assert int(ts.take(1)[0]) == full[(pos + 5) % n]


def _reference_batches(full: np.ndarray, steps: int, ws: int, local: int, seq: int, rank: int):
    span = local + 1
    stream = np.tile(full, steps * ws * span // len(full) + 2)
    out = []
    for s in range(steps):
        chunk = stream[s * ws * span : (s + 1) * ws * span]
        loc = chunk[rank * span : (rank + 1) * span]
        out.append((loc[:-1].reshape(-1, seq), loc[1:].reshape(-1, seq)))
    return out


def test_distributed_loader_two_ranks(stream_dir: tuple[Path, np.ndarray]) -> None:
    d, full = stream_dir
    world, accum, seq = 2, 2, 16
    global_tokens = 4 * 16 * world * accum  # 4 sequences per micro-batch and rank
    local = global_tokens // (world * accum)
    loaders = [DistributedTokenLoader(d, "fineweb_train_*.bin", r, world) for r in range(world)]
    steps = 3 * len(full) // (world * (local + 1)) + 1  # wraps around the stream 3 times
    for s in range(steps):
        xs, ys = zip(*(ld.next_batch(global_tokens, seq, accum) for ld in loaders))
        for r in range(world):
            x, y = xs[r], ys[r]
            assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.device.type == "cpu"
            assert x.shape == (local // seq, seq) and y.shape == x.shape
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
        # rank 1's span starts right after rank 0's span (consecutive, disjoint)
        r0 = torch.cat([xs[0].flatten(), ys[0].flatten()[-1:]])
        r1 = torch.cat([xs[1].flatten(), ys[1].flatten()[-1:]])
        assert int(r1[0]) == (int(r0[-1]) + 1) % len(full)
    for r in range(world):
        ref = _reference_batches(full, steps, world, local, seq, r)
        ld = DistributedTokenLoader(d, "fineweb_train_*.bin", r, world)
        for s in range(steps):
            x, y = ld.next_batch(global_tokens, seq, accum)
            assert np.array_equal(x.numpy(), ref[s][0]) and np.array_equal(y.numpy(), ref[s][1])


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 3), (3, 2)])
def test_next_step_is_a_steps_next_batch_calls(stream_dir: tuple[Path, np.ndarray], world: int, accum: int) -> None:
    """train.step_batch_copy's rows: row m of next_step is the m-th next_batch call's x with y's
    last token, on every rank, across shard ends and the stream's wrap, and the stream ends
    where those calls leave it."""
    d, full = stream_dir
    seq = 16
    global_tokens = 3 * seq * world * accum
    for r in range(world):
        calls = DistributedTokenLoader(d, rank=r, world_size=world)
        rows = DistributedTokenLoader(d, rank=r, world_size=world)
        assert rows.step_shape(global_tokens, seq, accum) == (accum, 3 * seq + 1)
        buf = np.full((accum, 3 * seq + 1), -1, dtype=np.int32)
        steps = 2 * len(full) // (world * accum * (3 * seq + 1)) + 1  # past the stream's end twice
        for s in range(steps):
            got = rows.next_step(global_tokens, seq, accum, out=buf) if s % 2 else rows.next_step(global_tokens, seq, accum)
            assert got.dtype == np.int32 and (got is buf) == bool(s % 2)
            for m in range(accum):
                x, y = calls.next_batch(global_tokens, seq, accum)
                assert np.array_equal(got[m, :-1].reshape(-1, seq), x.numpy())
                assert np.array_equal(got[m, 1:].reshape(-1, seq), y.numpy())
            assert rows.state_dict() == calls.state_dict()
    with pytest.raises(ValueError, match=r"out has shape \(2, 49\), not \(1, 49\)"):
        rows.next_step(3 * seq * world, seq, 1, out=np.empty((2, 49), dtype=np.int32))
    with pytest.raises(ValueError, match=r"take\(5\): out has shape \(4,\)"):
        rows.stream.take(5, np.empty(4, dtype=np.int32))


def test_distributed_loader_resume(stream_dir: tuple[Path, np.ndarray]) -> None:
    d, _ = stream_dir
    args = (512, 32, 2)
    for k in (0, 3, 7, 11):
        ref = DistributedTokenLoader(d, rank=1, world_size=2)
        run = DistributedTokenLoader(d, rank=1, world_size=2)
        for _ in range(k):
            ref.next_batch(*args)
            run.next_batch(*args)
        state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
        resumed = DistributedTokenLoader(d, rank=1, world_size=2)
        resumed.load_state_dict(state)
        for _ in range(3):
            xa, ya = ref.next_batch(*args)
            xb, yb = resumed.next_batch(*args)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_distributed_loader_errors(tmp_path: Path, stream_dir: tuple[Path, np.ndarray]) -> None:
    d, _ = stream_dir
    with pytest.raises(ValueError, match="seq_len"):
        DistributedTokenLoader(d, rank=0, world_size=1).next_batch(1000, 64, 1)
    with pytest.raises(ValueError):
        DistributedTokenLoader(d, rank=2, world_size=2)
    with pytest.raises(ShardError, match="missing directory"):
        DistributedTokenLoader(tmp_path / "missing", rank=0, world_size=1)
    with pytest.raises(ShardError, match="not a directory"):
        DistributedTokenLoader(d / "fineweb_val_000000.bin")
    with pytest.raises(ShardError, match="no shards matching"):
        DistributedTokenLoader(d, "nothing_*.bin")
    ld = DistributedTokenLoader(d)
    with pytest.raises(InputError, match=f"{d}: the saved stream state is over 1 shards"):
        ld.load_state_dict({"file_idx": 0, "pos": 0, "files": ["other.bin"]})
    with pytest.raises(InputError, match="out of range: file_idx=9"):
        ld.load_state_dict({"file_idx": 9, "pos": 0})


def test_loaders_check_ids_against_vocab_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _folder_with_bad_id(tmp_path, 60, 37)
    write_shard(tmp_path / "fineweb_val_000001.bin", [3, 4, 70])
    # without vocab_size nothing changes
    ld = DistributedTokenLoader(tmp_path)
    for _ in range(4):
        ld.next_batch(64, 8)
    assert load_val_tokens(tmp_path, seq_len=4).numel() == 13
    # with it, a shard holding an id >= vocab_size is refused when first read
    ld = DistributedTokenLoader(tmp_path, vocab_size=60)
    ld.next_batch(64, 8)  # 65 tokens of the first (good) shard
    with pytest.raises(ShardError, match=f"{bad}: token id 60 at position 37 is outside the vocabulary of 60 ids"):
        ld.next_batch(64, 8)
    with pytest.raises(ShardError, match="fineweb_val_000001.bin: token id 70 at position 2 .* of 64 ids"):
        load_val_tokens(tmp_path, seq_len=4, vocab_size=64)
    assert load_val_tokens(tmp_path, seq_len=4, vocab_size=71).numel() == 13
    # every shard is checked once, however often the stream wraps around
    checked: list[str] = []
    real_check = data.check_token_ids
    monkeypatch.setattr(data, "check_token_ids", lambda p, *a: (checked.append(Path(p).name), real_check(p, *a))[1])
    ld = DistributedTokenLoader(tmp_path, vocab_size=61)
    for _ in range(3 * 207 // 9 + 1):  # wraps around the 207-token stream 3 times
        ld.next_batch(8, 8)
    assert checked == [f"fineweb_train_{i:06d}.bin" for i in range(3)]


def test_loader_keeps_one_shard_mapped(stream_dir: tuple[Path, np.ndarray]) -> None:
    d, _ = stream_dir
    ld = DistributedTokenLoader(d)
    for _ in range(20):
        ld.next_batch(256, 64, 1)
    assert ld.stream._tokens is not None and ld.stream._loaded_idx == ld.stream.file_idx


def test_load_val_tokens(tmp_path: Path) -> None:
    _make_dir(tmp_path, [np.arange(100), np.arange(100, 150)], [np.arange(5)])
    v = load_val_tokens(tmp_path, "fineweb_val_*.bin", seq_len=16)
    assert v.dtype == torch.int64
    assert v.tolist() == list(range(((150 - 1) // 16) * 16 + 1))  # 145 tokens
    v = load_val_tokens(tmp_path, "fineweb_val_*.bin", seq_len=16, max_tokens=120)
    assert v.numel() == ((120 - 1) // 16) * 16 + 1 and v.tolist() == list(range(113))
    v = load_val_tokens(tmp_path, "fineweb_val_*.bin", seq_len=149)
    assert v.numel() == 150
    with pytest.raises(ShardError, match="too short"):
        load_val_tokens(tmp_path, "fineweb_val_*.bin", seq_len=150)
    with pytest.raises(ValueError, match="too short"):
        load_val_tokens(tmp_path, "fineweb_val_*.bin", seq_len=16, max_tokens=10)
    with pytest.raises(ShardError):
        load_val_tokens(tmp_path / "missing", "fineweb_val_*.bin", seq_len=16)


@pytest.mark.parametrize("module", [data, corpus])
def test_module_reads_no_environment(module) -> None:
    src = Path(module.__file__).read_text()
    assert "os.environ" not in src and "getenv" not in src
