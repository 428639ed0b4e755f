"""Tests for lmcore.bpb: byte tables, byte counting on BOS-prefixed docs, the bpb meter."""

from __future__ import annotations

import itertools
import json
import lzma
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

spm = pytest.importorskip("sentencepiece")

from lmcore.bpb import (
    BpbMeter,
    ByteTables,
    bpb,
    byte_count_report,
    doc_bytes,
    load_sentencepiece,
    stream_bytes,
    token_bytes,
)
from lmcore.errors import InputError, InputNotFound

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFICIAL_TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
PROXY_DOCS = SHARED / "data" / "proxy_docs.jsonl.xz"
PROXY_N_DOCS = 2000

WORDS = [
    "the",
    "cat",
    "sat",
    "naïve",
    "café",
    "über",
    "straße",
    "日本語",
    "emoji😀",
    "Ångström",
    "x=y",
    "snake_case",
    "tab\there",
    "two  spaces",
    "new\nline",
    "Ελληνικά",
    "Русский",
    "€100",
    "ﬁne",
    "—dash—",
    "“quoted”",
    "1234",
]


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory: pytest.TempPathFactory):
    """A byte-fallback BPE model that keeps text as is (identity normaliser)."""
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(600, 0)),
        model_prefix=str(d / "tiny"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,  # rare characters go through byte fallback
        bos_id=1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,  # first piece of a doc gets a "▁" that must not count
        minloglevel=2,
        num_threads=1,
    )
    return spm.SentencePieceProcessor(model_file=str(d / "tiny.model"))


def _count_docs(tables: ByteTables, sp, docs: list[str]) -> tuple[torch.Tensor, int]:
    """Bytes of all targets of the concatenated BOS-prefixed docs (positions 1..N)."""
    bos = np.array([sp.bos_id()], dtype=np.int64)
    stream = np.concatenate([np.concatenate([bos, np.asarray(ids, dtype=np.int64)]) for ids in sp.encode(docs)])
    ids = torch.from_numpy(stream)
    return token_bytes(tables, ids[:-1], ids[1:]), len(stream)


# ---------------------------------------------------------------- tables


def test_tables_from_sentencepiece(tiny_sp) -> None:
    t = ByteTables.from_sentencepiece(tiny_sp)
    n = tiny_sp.get_piece_size()
    assert t.size == n
    assert t.base_bytes.dtype == torch.int16
    assert t.leading_space.dtype == torch.bool and t.boundary.dtype == torch.bool
    for i in range(n):
        piece = tiny_sp.id_to_piece(i)
        if tiny_sp.is_control(i) or tiny_sp.is_unknown(i):
            assert bool(t.boundary[i]) and int(t.base_bytes[i]) == 0
        elif tiny_sp.is_byte(i):
            assert int(t.base_bytes[i]) == 1 and not bool(t.boundary[i])
        else:
            stripped = piece.removeprefix("▁")
            assert int(t.base_bytes[i]) == len(stripped.encode("utf-8"))
            assert bool(t.leading_space[i]) == piece.startswith("▁")
    # BOS and UNK are boundaries
    assert bool(t.boundary[1]) and bool(t.boundary[0])


def test_tables_padded_vocab_and_path(tiny_sp, tmp_path: Path) -> None:
    path = tmp_path / "m.model"
    path.write_bytes(tiny_sp.serialized_model_proto())
    n = tiny_sp.get_piece_size()
    t = ByteTables.from_sentencepiece(path, vocab_size=n + 24)
    assert t.size == n + 24
    assert bool(t.boundary[n:].all()) and int(t.base_bytes[n:].abs().sum()) == 0
    assert not bool(t.leading_space[n:].any())
    # a smaller vocab_size never truncates
    assert ByteTables.from_sentencepiece(str(path), vocab_size=8).size == n
    with pytest.raises(FileNotFoundError):
        ByteTables.from_sentencepiece(tmp_path / "missing.model")


def test_bad_tokenizer_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.model"
    with pytest.raises(InputNotFound, match=f"{missing}: SentencePiece model not found"):
        load_sentencepiece(missing)
    garbage = tmp_path / "x.model"
    garbage.write_bytes(random.Random(0).randbytes(3000))
    for load in (load_sentencepiece, ByteTables.from_sentencepiece, lambda m: byte_count_report(m, ["a"])):
        with pytest.raises(InputError, match=f"{garbage}: not a loadable SentencePiece model"):
            load(garbage)
        with pytest.raises(InputError, match="not a loadable"):
            load(str(garbage))


def test_token_bytes_rule() -> None:
    # ids: 0 = BOS (boundary), 1 = "▁ab" (2 + space), 2 = "c" (1), 3 = byte piece (1)
    t = ByteTables(
        base_bytes=torch.tensor([0, 2, 1, 1], dtype=torch.int16),
        leading_space=torch.tensor([False, True, False, False]),
        boundary=torch.tensor([True, False, False, False]),
    )
    prev = torch.tensor([0, 1, 2, 3, 0])
    tgt = torch.tensor([1, 1, 2, 3, 2])
    out = token_bytes(t, prev, tgt)
    assert out.dtype == torch.int32
    assert out.tolist() == [2, 3, 1, 1, 1]
    assert stream_bytes(t, [0, 1, 1, 2]) == 2 + 3 + 1
    with pytest.raises(ValueError):
        token_bytes(t, prev[:2], tgt)


# ---------------------------------------------------------------- byte count on docs


def test_bos_docs_bytes_equal_utf8_text(tiny_sp) -> None:
    tables = ByteTables.from_sentencepiece(tiny_sp)
    docs = _corpus(300, 1) + ["  leading spaces", "trailing  ", "😀 first", "\n\nx", "a", ""]
    assert any(ord(c) > 127 for d in docs for c in d)
    nb, n = _count_docs(tables, tiny_sp, docs)
    assert nb.numel() == n - 1
    assert int(nb.sum()) == sum(len(d.encode("utf-8")) for d in docs)
    # doc by doc too, and the report agrees
    for d in docs[:50] + docs[-6:]:
        assert stream_bytes(tables, [1] + tiny_sp.encode(d)) == len(d.encode("utf-8")), repr(d)
    assert doc_bytes(tables, tiny_sp.encode(docs), 1) == [len(d.encode("utf-8")) for d in docs]
    rep = byte_count_report(tiny_sp, docs, tables)
    assert rep.ok and rep.unk_tokens == 0
    assert rep.counted_bytes == rep.raw_bytes == rep.normalized_bytes
    assert rep.docs_equal_raw == len(docs)


def test_byte_fallback_pieces_are_used(tiny_sp) -> None:
    ids = tiny_sp.encode("😀 Ωmega")
    assert any(tiny_sp.is_byte(i) for i in ids)
    tables = ByteTables.from_sentencepiece(tiny_sp)
    assert stream_bytes(tables, [1] + ids) == len("😀 Ωmega".encode())


# ---------------------------------------------------------------- meter


def test_bpb_helper() -> None:
    assert bpb(math.log(2) * 10, 5) == pytest.approx(2.0)
    assert math.isnan(bpb(1.0, 0))


def test_meter_matches_hand_computation() -> None:
    t = ByteTables(
        base_bytes=torch.tensor([0, 2, 1, 3], dtype=torch.int16),
        leading_space=torch.tensor([False, True, False, True]),
        boundary=torch.tensor([True, False, False, False]),
    )
    x = torch.tensor([[0, 1, 3, 2], [2, 0, 3, 1]])
    y = torch.tensor([[1, 3, 2, 0], [0, 3, 1, 1]])
    nll = torch.tensor([[1.0, 2.0, 0.5, 0.25], [3.0, 1.5, 0.75, 2.0]], dtype=torch.bfloat16)
    m = BpbMeter(t)
    m.add(nll, x, y)
    # bytes by hand: row 0: 1 after 0 -> 2, 3 after 1 -> 4, 2 after 3 -> 1, 0 -> 0
    #                row 1: 0 -> 0, 3 after 0 (boundary) -> 3, 1 after 3 -> 3, 1 after 1 -> 3
    hand_bytes = 2 + 4 + 1 + 0 + 0 + 3 + 3 + 3
    hand_nats = float(nll.double().sum())
    assert m.bytes == hand_bytes and m.tokens == 8
    assert m.loss == pytest.approx(hand_nats / 8, rel=1e-12)
    assert m.bpb == pytest.approx(hand_nats / math.log(2) / hand_bytes, rel=1e-12)
    m.add_sums(torch.tensor(4.0), 2, 5)
    d = m.as_dict()
    assert d["tokens"] == 10 and d["bytes"] == hand_bytes + 5
    assert d["bpb"] == pytest.approx((hand_nats + 4.0) / math.log(2) / (hand_bytes + 5))
    assert d["loss"] == pytest.approx((hand_nats + 4.0) / 10)
    # a mask scores only the selected targets
    m2 = BpbMeter(t)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 2:] = True
    m2.add(nll, x, y, mask=mask)
    assert m2.tokens == 4 and m2.bytes == 1 + 0 + 3 + 3
    assert m2.nats == pytest.approx(float(nll[:, 2:].double().sum()))
    m2.all_reduce()  # no process group: a no-op
    assert m2.tokens == 4
    m2.reset()
    assert m2.tokens == 0 and math.isnan(m2.bpb)


def test_meter_float64_accumulation() -> None:
    t = ByteTables(
        base_bytes=torch.tensor([0, 3], dtype=torch.int16),
        leading_space=torch.tensor([False, False]),
        boundary=torch.tensor([True, False]),
    )
    m = BpbMeter(t)
    ids = torch.ones(1000, dtype=torch.long)
    for _ in range(100):
        m.add(torch.full((1000,), 0.1), ids, ids)
    assert m.tokens == 100_000 and m.bytes == 300_000
    assert m.nats == pytest.approx(100_000 * float(torch.tensor(0.1)), rel=1e-12)


# ---------------------------------------------------------------- official tokenizer, proxy corpus


def _proxy_docs(n: int) -> list[str]:
    out: list[str] = []
    with lzma.open(PROXY_DOCS, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


needs_shared = pytest.mark.skipif(
    not (OFFICIAL_TOKENIZER.is_file() and PROXY_DOCS.is_file()),
    reason="../shared tokenizer or proxy corpus absent",
)


@pytest.fixture(scope="module")
def proxy():
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_TOKENIZER))
    texts = _proxy_docs(PROXY_N_DOCS)
    return sp, texts, sp.encode(texts), ByteTables.from_sentencepiece(sp, vocab_size=1024)


@needs_shared
def test_proxy_bytes_equal_decoded_text(proxy) -> None:
    """SPEC 2's check: counted bytes == UTF-8 bytes of the decoded docs.

    Exact for every doc without <unk>. The official tokenizer has no byte fallback, so
    characters outside its vocabulary ('=', '_', '`', '*', CJK, ...) become <unk>, which
    the rule counts as 0 bytes and as a boundary (the next piece's leading space is not
    counted either); sp.decode renders each <unk> as " ⁇ " (5 bytes). With those two
    corrections the equality is exact for every doc.
    """
    sp, _texts, encoded, tables = proxy
    unk = sp.unk_id()
    n_clean = 0
    lead = tables.leading_space.tolist()
    for ids, counted in zip(encoded, doc_bytes(tables, encoded, sp.bos_id())):
        decoded = len(sp.decode(ids).encode("utf-8"))
        n_unk = sum(1 for t in ids if t == unk)
        if n_unk == 0:
            n_clean += 1
            assert counted == decoded
        unk_then_space = sum(1 for a, b in itertools.pairwise(ids) if a == unk and lead[b])
        assert counted == decoded - 5 * n_unk - unk_then_space
    assert n_clean >= 100


@needs_shared
def test_proxy_bytes_equal_normalized_text(proxy) -> None:
    """Docs without <unk>: counted bytes == the tokenizer's normalised text exactly."""
    sp, texts, encoded, tables = proxy
    rep = byte_count_report(sp, texts, tables)
    assert rep.docs == PROXY_N_DOCS
    assert rep.ok, f"docs without <unk> that disagree: {rep.mismatched_docs[:10]}"
    assert rep.tokens == sum(len(ids) + 1 for ids in encoded)
    # normalisation only drops bytes (whitespace folding, NFKC), <unk> drops more
    assert rep.counted_bytes <= rep.normalized_bytes <= rep.raw_bytes


@needs_shared
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "the official tokenizer normalises text (nmt_nfkc, remove_extra_whitespaces: "
        "newlines/tabs/runs of spaces fold to one space, leading/trailing space dropped, "
        "NFKC) and has no byte fallback (unknown characters are <unk> = 0 bytes), so raw "
        "text bytes differ for almost every proxy doc; see test_proxy_bytes_equal_decoded_text"
    ),
)
def test_proxy_bytes_equal_raw_text(proxy) -> None:
    sp, texts, _encoded, tables = proxy
    nb, _ = _count_docs(tables, sp, texts)
    assert int(nb.sum()) == sum(len(t.encode("utf-8")) for t in texts)
