"""Tests for lmcore.fineweb: the resumable FineWeb download, against a local fake hub
(with and without manifest.json) and through a stubbed huggingface_hub (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcore import cli, fineweb
from lmcore.data import ShardError, check_dir, read_shard, write_shard
from lmcore.fineweb import download_fineweb, fake_hub_fetch

DS = "datasets/fineweb10B_sp1024"
TOK = "tokenizers/fineweb_1024_bpe.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    text = "\n".join(f"line {i} of the tiny tokenizer corpus, word{i % 17}" for i in range(200))
    (d / "t.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "t.txt"),
        model_prefix=str(d / "tiny"),
        vocab_size=64,
        model_type="bpe",
        hard_vocab_limit=False,
        bos_id=1,
        eos_id=-1,
        minloglevel=2,
    )
    return d / "tiny.model"


def _make_hub(root: Path, sp_model: Path, *, manifest: bool, val: int = 2, train: int = 5) -> Path:
    """A folder mirroring the dataset repo: everything under the remote root `datasets/`."""
    base = root / "datasets"
    for i in range(val):
        write_shard(base / DS / f"fineweb_val_{i:06d}.bin", np.arange(100 + i) % 1024)
    for i in range(train):
        write_shard(base / DS / f"fineweb_train_{i:06d}.bin", (np.arange(300) * (i + 3)) % 1024)
    (base / "tokenizers").mkdir(parents=True)
    shutil.copyfile(sp_model, base / TOK)
    (base / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<unk>\t0\n", encoding="utf-8")
    if manifest:
        (base / "manifest.json").write_text(
            json.dumps(
                {
                    "datasets": [
                        {
                            "name": "fineweb10B_sp1024",
                            "tokenizer_name": "sp_bpe_1024",
                            "path": DS,
                            "stats": {"files_train": train, "files_val": val},
                        }
                    ],
                    "tokenizers": [
                        {
                            "name": "sp_bpe_1024",
                            "model_path": TOK,
                            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
                        }
                    ],
                }
            ),
            encoding="utf-8",
        )
    return root


class CountingFetch:
    def __init__(self, hub: Path) -> None:
        self.inner = fake_hub_fetch(hub)
        self.calls: list[str] = []

    def __call__(self, repo_filename: str, dest_dir: Path) -> str:
        self.calls.append(repo_filename)
        return self.inner(repo_filename, dest_dir)


def test_download_with_manifest(tmp_path: Path, sp_model: Path) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=True, val=2, train=5)
    out = tmp_path / "data"
    fetch = CountingFetch(hub)
    res = download_fineweb(out, train_shards=3, fetch=fetch, progress=False)
    want = ["manifest.json", f"{DS}/fineweb_val_000000.bin", f"{DS}/fineweb_val_000001.bin"]
    want += [f"{DS}/fineweb_train_{i:06d}.bin" for i in range(3)]
    want += [TOK, "tokenizers/fineweb_1024_bpe.vocab"]
    assert res["downloaded"] == want and res["skipped"] == [] and res["manifest"] is True
    assert sorted(fetch.calls) == sorted(f"datasets/{w}" for w in want)
    assert res["dataset_dir"] == str(out / DS) and res["tokenizer"] == str(out / TOK)
    for rel in want:
        assert (out / rel).read_bytes() == (hub / "datasets" / rel).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["datasets", "manifest.json", "tokenizers"]
    assert check_dir(out / DS) == {
        "dir": str(out / DS),
        "vocab_size": 1024,
        "vocab_from": "the default; no build.json",
        "val": {"files": 2, "tokens": 201},
        "train": {"files": 3, "tokens": 900},
    }
    # a second run skips everything and fetches nothing
    fetch2 = CountingFetch(hub)
    res2 = download_fineweb(out, train_shards=3, fetch=fetch2, progress=False)
    assert res2["downloaded"] == [] and res2["skipped"] == want and fetch2.calls == []
    # asking for more shards fetches only the new ones
    res3 = download_fineweb(out, train_shards=5, fetch=fetch2, progress=False, workers=1)
    assert res3["downloaded"] == [f"{DS}/fineweb_train_000003.bin", f"{DS}/fineweb_train_000004.bin"]
    # more shards than the manifest lists is an error
    with pytest.raises(ValueError, match="has 5 train shards, 6 were requested"):
        download_fineweb(out, train_shards=6, fetch=fetch2, progress=False)


def test_download_without_manifest(tmp_path: Path, sp_model: Path) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=False, val=2, train=4)
    out = tmp_path / "data"
    res = download_fineweb(out, train_shards=2, fetch=fake_hub_fetch(hub), progress=False)
    assert res["manifest"] is False
    assert res["downloaded"] == [
        f"{DS}/fineweb_val_000000.bin",
        f"{DS}/fineweb_train_000000.bin",
        f"{DS}/fineweb_train_000001.bin",
        TOK,
    ]
    assert not (out / "manifest.json").exists()
    res2 = download_fineweb(out, train_shards=2, fetch=fake_hub_fetch(hub), progress=False)
    assert res2["downloaded"] == [] and len(res2["skipped"]) == 4


@pytest.mark.parametrize("damage", ["truncate", "magic", "garbage_model", "delete"])
def test_partial_or_corrupt_file_is_refetched(tmp_path: Path, sp_model: Path, damage: str) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=True)
    out = tmp_path / "data"
    download_fineweb(out, train_shards=3, fetch=fake_hub_fetch(hub), progress=False)
    target = out / (TOK if damage == "garbage_model" else f"{DS}/fineweb_train_000001.bin")
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "magic":
        target.write_bytes(b"\0\0\0\0" + raw[4:])
    elif damage == "garbage_model":
        target.write_bytes(b"not a model")
    else:
        target.unlink()
    fetch = CountingFetch(hub)
    res = download_fineweb(out, train_shards=3, fetch=fetch, progress=False)
    rel = str(target.relative_to(out))
    assert res["downloaded"] == [rel] and fetch.calls == [f"datasets/{rel}"]
    assert target.read_bytes() == raw


def test_corrupt_upstream_shard_is_not_placed(tmp_path: Path, sp_model: Path) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=True)
    bad = hub / "datasets" / DS / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    out = tmp_path / "data"
    with pytest.raises(ShardError, match="fineweb_train_000001.bin"):
        download_fineweb(out, train_shards=3, fetch=fake_hub_fetch(hub), progress=False, workers=1)
    assert not (out / DS / "fineweb_train_000001.bin").exists()
    assert read_shard(out / DS / "fineweb_train_000000.bin").size == 300


def test_missing_upstream_file(tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=False, train=2)
    with pytest.raises(FileNotFoundError, match="fineweb_train_000002.bin"):
        download_fineweb(tmp_path / "d", train_shards=3, fetch=fake_hub_fetch(hub), progress=False)
    argv = ["fineweb", "--train-shards", "3", "--out", str(tmp_path / "d"), "--hub-dir", str(hub), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fineweb_train_000002.bin not found in local hub mirror" in err
    assert cli.main([*argv[:-2], str(tmp_path / "no_hub"), "--no-progress"]) == 2
    assert f"{tmp_path / 'no_hub'}: local hub mirror folder not found" in capsys.readouterr().err


def test_more_shards_than_the_manifest_lists(
    tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=True, train=5)
    argv = ["fineweb", "--train-shards", "6", "--out", str(tmp_path / "d"), "--hub-dir", str(hub), "--no-progress"]
    assert cli.main(argv) == 2
    assert "--train-shards: the sp1024 repo has 5 train shards, 6 were requested" in capsys.readouterr().err


def test_unknown_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown variant 'sp9999'.*sp1024"):
        download_fineweb(tmp_path, variant="sp9999", fetch=fake_hub_fetch(tmp_path))
    rc = cli.main(["fineweb", "--variant", "sp9999", "--out", str(tmp_path / "o"), "--hub-dir", str(tmp_path)])
    assert rc == 2 and "sp9999" in capsys.readouterr().err


def test_cli_with_hub_dir(tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = _make_hub(tmp_path / "hub", sp_model, manifest=True)
    out = tmp_path / "data"
    rc = cli.main(
        [
            "fineweb",
            "--variant",
            "sp1024",
            "--train-shards",
            "2",
            "--out",
            str(out),
            "--hub-dir",
            str(hub),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["downloaded"]) == 7 and (out / DS / "fineweb_train_000001.bin").is_file()
    assert cli.main(["data", "check", str(out / DS)]) == 0


def test_default_fetch_uses_huggingface_hub(tmp_path: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = _make_hub(tmp_path / "hub", sp_model, manifest=False, train=2)
    calls: list[dict[str, Any]] = []

    def fake_hf_hub_download(
        repo_id: str, filename: str, *, repo_type: str | None = None, local_dir: str | None = None, **kw: Any
    ) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type, "local_dir": local_dir})
        src = hub / filename
        if not src.is_file():
            raise EntryNotFoundError(f"404: {filename}")
        assert local_dir is not None
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    out = tmp_path / "data"
    res = download_fineweb(out, train_shards=2, progress=False)
    assert {c["repo_id"] for c in calls} == {"willdepueoai/parameter-golf"}
    assert {c["repo_type"] for c in calls} == {"dataset"}
    assert sorted(c["filename"] for c in calls) == sorted(
        [
            "datasets/manifest.json",  # absent upstream: the known naming is used
            f"datasets/{DS}/fineweb_val_000000.bin",
            f"datasets/{DS}/fineweb_train_000000.bin",
            f"datasets/{DS}/fineweb_train_000001.bin",
            f"datasets/{TOK}",
        ]
    )
    assert res["manifest"] is False and len(res["downloaded"]) == 4
    assert (out / DS / "fineweb_train_000001.bin").is_file() and (out / TOK).is_file()
    assert not (out / fineweb.STAGING_DIR).exists()
    # a custom repo id is passed through
    calls.clear()
    download_fineweb(tmp_path / "d2", train_shards=0, repo_id="me/mirror", progress=False)
    assert {c["repo_id"] for c in calls} == {"me/mirror"}


def test_module_reads_no_environment() -> None:
    src = Path(fineweb.__file__).read_text()
    assert "os.environ" not in src and "getenv" not in src
