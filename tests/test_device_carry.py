"""scripts/device_carry.sh: the carried folders made from a stand-in ../shared and a stand-in mirror (a git repository
with the original's branch and path), in a folder of the test's; .whl made beforehand (no download here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_carry.sh"
PATH_IN_REPO = "records/track_10min_16mb/2026-04-05_11L_LatentMaskTTT_GPTQ_ProductKey_Brotli/train_gpt.py"


def _run(dest: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={**os.environ, "DEST": str(dest), **env})


def _shared(root: Path) -> Path:
    shared = root / "shared"
    for rel, text in [("data/proxy_docs.jsonl.xz", "docs"), ("tokenizers/fineweb_1024_bpe.model", "model"),
                      ("tokenizers/fineweb_1024_bpe.vocab", "vocab"), ("bench/flash_attn_interface.py", "shim"),
                      ("bench/run_seed.py", "run"), ("fa3/dist/flash_attn_3-3.0.0-cp310-abi3-linux_x86_64.whl", "whl"),
                      ("fa3/fa3-src.tar.xz", "src")]:
        (shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (shared / rel).write_text(text)
    return shared


def _mirror(root: Path) -> Path:
    repo = root / "mirror"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "record/latentmask-ttt-gptq-productkey-brotli", str(repo)], check=True)
    (repo / PATH_IN_REPO).parent.mkdir(parents=True)
    (repo / PATH_IN_REPO).write_text("the original\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    return repo


def test_the_four_folders_from_shared_and_the_mirror(tmp_path: Path):
    shared, mirror, dest = _shared(tmp_path), _mirror(tmp_path), tmp_path / "checkout"
    (dest / ".whl").mkdir(parents=True)  # already there: left as it is, so nothing is downloaded
    out = _run(dest, SHARED=str(shared), MIRROR=str(mirror))
    assert out.returncode == 0, out.stderr
    assert "device_carry: .whl already there" in out.stdout
    assert sorted(p.name for p in (dest / ".data").iterdir()) == ["fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab",
                                                                   "proxy_docs.jsonl.xz"]
    assert (dest / ".ref" / "seed_train_gpt.py").read_text() == "the original\n"
    assert sorted(p.name for p in (dest / ".ref").iterdir()) == ["flash_attn_interface.py", "run_seed.py",
                                                                  "seed_train_gpt.py"]
    assert [p.name for p in (dest / ".fa3" / "dist").iterdir()] == ["flash_attn_3-3.0.0-cp310-abi3-linux_x86_64.whl"]
    assert (dest / ".fa3" / "fa3-src.tar.xz").read_text() == "src"
    assert not list(dest.glob(".*.tmp"))
    (dest / ".data" / "proxy_docs.jsonl.xz").write_text("kept")  # a second run leaves every folder as it is
    assert _run(dest, SHARED=str(shared), MIRROR=str(mirror)).returncode == 0
    assert (dest / ".data" / "proxy_docs.jsonl.xz").read_text() == "kept"


def test_a_missing_input_is_one_line_and_exit_2(tmp_path: Path):
    shared, dest = _shared(tmp_path), tmp_path / "checkout"
    dest.mkdir()
    out = _run(dest, SHARED=str(shared), MIRROR="")
    assert out.returncode == 2 and not (dest / ".ref").exists()
    assert out.stderr.strip() == "device_carry: MIRROR: not set (the git directory of a fetched github:izlley/parameter-golf)"
    out = _run(dest, SHARED=str(shared), MIRROR=str(tmp_path / "none"))
    assert out.returncode == 2 and out.stderr.strip() == f"device_carry: {tmp_path / 'none'}: no such file (see ../shared/DEVICE.md)"
    empty = tmp_path / "empty"
    subprocess.run(["git", "init", "-q", str(empty)], check=True)
    out = _run(dest, SHARED=str(shared), MIRROR=str(empty))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"device_carry: {empty}: no record/latentmask-ttt-gptq-productkey-brotli:{PATH_IN_REPO}")
    assert not (dest / ".ref").exists() and not (dest / ".ref.tmp").exists()
    (shared / "data" / "proxy_docs.jsonl.xz").unlink()
    (tmp_path / "other").mkdir()
    out = _run(tmp_path / "other", SHARED=str(shared))
    assert out.returncode == 2 and not (tmp_path / "other" / ".data").exists()
    assert out.stderr.strip() == f"device_carry: {shared}/data/proxy_docs.jsonl.xz: no such file (see ../shared/DEVICE.md)"
