"""Download the official FineWeb shards and tokenizer of the challenge from Hugging Face.

The published export lives in the dataset repo `willdepueoai/parameter-golf` under the
remote root `datasets/`:

    datasets/manifest.json                                   (optional: shard counts)
    datasets/datasets/fineweb10B_sp1024/fineweb_val_NNNNNN.bin
    datasets/datasets/fineweb10B_sp1024/fineweb_train_NNNNNN.bin
    datasets/tokenizers/fineweb_1024_bpe.model

and is laid out locally without the remote root: `OUT/manifest.json`,
`OUT/datasets/fineweb10B_sp1024/*.bin`, `OUT/tokenizers/*.model`. The whole val split
is fetched (as many files as the manifest lists; `fineweb_val_000000.bin` without a
manifest), plus the first `train_shards` train shards.

Downloads are resumable: a local file that is already complete (a shard whose header
and size agree, a tokenizer that loads) is skipped, anything else is fetched again.
Every fetched file is validated in a staging folder beside the output and renamed into
place, so an interrupted run never leaves a partial file under its final name. The
fetch function is injectable (`fake_hub_fetch` mirrors the repo from a local folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmcore.data import ShardError, read_header, shard_name
from lmcore.errors import InputError, InputNotFound

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
# variant -> (dataset folder, tokenizer model file)
VARIANTS: dict[str, tuple[str, str]] = {
    "sp1024": ("fineweb10B_sp1024", "fineweb_1024_bpe.model"),
}
STAGING_DIR = ".lmcore-download"

# fetch(repo_filename, dest_dir) -> local path of the fetched file.
# A file missing from the repo must raise FileNotFoundError (lmcore's raise InputNotFound).
FetchFn = Callable[[str, Path], "str | os.PathLike[str]"]


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def hf_fetch(repo_id: str = DEFAULT_REPO_ID) -> FetchFn:
    """A fetch function downloading from the Hugging Face dataset repo `repo_id`."""

    def fetch(repo_filename: str, dest_dir: Path) -> str:
        import huggingface_hub

        not_found: tuple[type[BaseException], ...] = ()
        errors = getattr(huggingface_hub, "errors", None)
        for mod in (errors, getattr(huggingface_hub, "utils", None)):
            cls = getattr(mod, "EntryNotFoundError", None) if mod is not None else None
            if isinstance(cls, type):
                not_found += (cls,)
        try:
            return str(
                huggingface_hub.hf_hub_download(
                    repo_id=repo_id,
                    filename=repo_filename,
                    repo_type="dataset",
                    local_dir=str(dest_dir),
                )
            )
        except not_found as e:
            raise InputNotFound(f"{repo_filename} not found in dataset repo {repo_id}") from e

    return fetch


def fake_hub_fetch(hub_dir: str | os.PathLike[str]) -> FetchFn:
    """A fetch function copying from a local folder that mirrors the dataset repo's layout
    (for offline mirrors and tests)."""
    root = Path(hub_dir)

    def fetch(repo_filename: str, dest_dir: Path) -> str:
        src = root / repo_filename
        if not src.is_file():
            raise InputNotFound(f"{repo_filename} not found in local hub mirror {root}")
        dst = Path(dest_dir) / repo_filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return str(dst)

    return fetch


def _validate(path: Path, label: str) -> None:
    """Raise ShardError / InputError if `path` is not a complete file of its kind."""
    name = path.name
    if name.endswith(".bin"):
        read_header(path)
    elif name.endswith(".model"):
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # how sentencepiece reports a bad file
            raise InputError(f"{label}: not a loadable SentencePiece model ({e})") from None
    elif name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{label}: not valid JSON ({e})") from None
    elif path.stat().st_size == 0:
        raise InputError(f"{label}: empty file")


def _is_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        _validate(path, str(path))
    except (ValueError, OSError):
        return False
    return True


def _fetch_into_place(fetch: FetchFn, repo_filename: str, final: Path, staging: Path) -> None:
    """Fetch one file, validate it, and rename it to `final` atomically."""
    got = Path(fetch(repo_filename, staging))
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = got.resolve()
    if staging.resolve() not in staged.parents:
        # The fetcher returned a file it owns (e.g. a cache): copy it beside the target.
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(got, tmp)
        staged = Path(tmp)
    try:
        try:
            _validate(staged, repo_filename)
        except ShardError as e:
            raise ShardError(f"downloaded {repo_filename} is not a valid shard: {e}") from None
        os.replace(staged, final)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _plan(manifest: dict[str, Any] | None, variant: str, train_shards: int) -> tuple[int, list[str]]:
    """(number of val shards, tokenizer paths relative to the remote root)."""
    dataset, tokenizer = VARIANTS[variant]
    if manifest is None:
        return 1, [f"tokenizers/{tokenizer}"]
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), None)
    if entry is None:
        raise InputError(f"manifest.json lists no dataset named {dataset}")
    stats = entry.get("stats") or {}
    val_shards = int(stats.get("files_val", 1))
    if "files_train" in stats and train_shards > int(stats["files_train"]):
        have = int(stats["files_train"])
        raise InputError(f"--train-shards: the {variant} repo has {have} train shards, {train_shards} were requested")
    tok_name = entry.get("tokenizer_name")
    tok_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    tok_files = [str(tok_entry[k]) for k in ("model_path", "vocab_path") if tok_entry and tok_entry.get(k)]
    if not any(f.endswith(".model") for f in tok_files):
        tok_files.insert(0, f"tokenizers/{tokenizer}")
    return val_shards, tok_files


def download_fineweb(
    out_dir: str | os.PathLike[str],
    variant: str = "sp1024",
    train_shards: int = 80,
    repo_id: str = DEFAULT_REPO_ID,
    fetch: FetchFn | None = None,
    progress: bool = True,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    workers: int = 4,
) -> dict[str, Any]:
    """Download (or complete) the FineWeb export of `variant` into `out_dir`.

    `fetch(repo_filename, dest_dir) -> local path` gets one repo file; by default it is
    `huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset",
    local_dir=dest_dir)`. Files are fetched by `workers` threads. Returns
    {"dir", "dataset_dir", "tokenizer", "manifest", "downloaded", "skipped"}, the last two
    as local paths relative to `out_dir`.
    """
    from tqdm import tqdm

    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; known variants: {', '.join(sorted(VARIANTS))}")
    if train_shards < 0:
        raise InputError(f"--train-shards must be >= 0, got {train_shards}")
    fetch = fetch or hf_fetch(repo_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING_DIR
    staging.mkdir(exist_ok=True)
    downloaded: list[str] = []
    skipped: list[str] = []

    # 1. The manifest (optional upstream): it tells how many val shards there are.
    man_path = out / "manifest.json"
    have_manifest = True
    if _is_complete(man_path):
        skipped.append("manifest.json")
    else:
        try:
            _fetch_into_place(fetch, _join(remote_root, "manifest.json"), man_path, staging)
            downloaded.append("manifest.json")
        except FileNotFoundError:
            have_manifest = False  # not published: fall back to the known naming
    manifest: dict[str, Any] | None = None
    if have_manifest:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise InputError(f"{man_path}: expected a JSON object")

    # 2. Everything else, planned from the manifest or the known naming.
    dataset, _ = VARIANTS[variant]
    val_shards, tok_files = _plan(manifest, variant, train_shards)
    rel_files = [f"datasets/{dataset}/{shard_name('val', i)}" for i in range(val_shards)]
    rel_files += [f"datasets/{dataset}/{shard_name('train', i)}" for i in range(train_shards)]
    rel_files += tok_files

    todo = []
    for rel in rel_files:
        if _is_complete(out / rel):
            skipped.append(rel)
        else:
            todo.append(rel)

    def one(rel: str) -> str:
        _fetch_into_place(fetch, _join(remote_root, rel), out / rel, staging)
        return rel

    bar = tqdm(total=len(todo), desc="downloading", unit="file", disable=not progress or not todo)
    try:
        if workers <= 1 or len(todo) <= 1:
            for rel in todo:
                downloaded.append(one(rel))
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(one, rel) for rel in todo]
                try:
                    for fut in futures:  # in plan order; the first error stops the rest
                        downloaded.append(fut.result())
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    shutil.rmtree(staging, ignore_errors=True)

    model = next(f for f in tok_files if f.endswith(".model"))
    return {
        "dir": str(out),
        "dataset_dir": str(out / "datasets" / dataset),
        "tokenizer": str(out / model),
        "manifest": manifest is not None,
        "downloaded": downloaded,
        "skipped": skipped,
    }


def _cmd_fineweb(args: argparse.Namespace) -> int:
    fetch = fake_hub_fetch(args.hub_dir) if args.hub_dir else None
    if args.hub_dir and not Path(args.hub_dir).is_dir():
        raise InputNotFound(f"{args.hub_dir}: local hub mirror folder not found")
    result = download_fineweb(
        args.out,
        variant=args.variant,
        train_shards=args.train_shards,
        repo_id=args.repo_id,
        fetch=fetch,
        progress=not args.no_progress,
        remote_root=args.remote_root,
        workers=args.workers,
    )
    print(json.dumps(result, indent=2))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `lmcore fineweb`."""
    p = subparsers.add_parser(
        "fineweb",
        help="download the official FineWeb shards and tokenizer (resumable)",
        description="Download the challenge's FineWeb export from the Hugging Face dataset "
        "repo into OUT/datasets/<dataset>/ and OUT/tokenizers/. Complete files are skipped; "
        "partial or corrupt ones are fetched again. Prints what was downloaded as JSON.",
    )
    p.add_argument(
        "--variant", default="sp1024", help=f"tokenizer variant ({', '.join(sorted(VARIANTS))}; default sp1024)"
    )
    p.add_argument(
        "--train-shards", type=int, default=80, help="number of train shards of 100M tokens to fetch (default 80)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (shards go to OUT/datasets/<dataset>/, the tokenizer to OUT/tokenizers/)",
    )
    p.add_argument("--repo-id", default=DEFAULT_REPO_ID, help=f"Hugging Face dataset repo (default {DEFAULT_REPO_ID})")
    p.add_argument(
        "--remote-root",
        default=DEFAULT_REMOTE_ROOT,
        help=f"folder of the export inside the repo (default {DEFAULT_REMOTE_ROOT!r}; '' for the repo root)",
    )
    p.add_argument(
        "--hub-dir",
        default=None,
        help="a local folder mirroring the dataset repo's file layout (e.g. "
        "HUB/datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin), used instead of "
        "Hugging Face: for offline mirrors and tests",
    )
    p.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(func=_cmd_fineweb)
