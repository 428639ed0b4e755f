"""Run folders and safe file writes: atomic text/JSON/bytes writes, sha256, JSONL appends,
and the lock that keeps two jobs out of one run folder.

Everything lmcore writes into a run folder goes through these helpers so that an
interrupted process never leaves a half-written file behind: data is written to a
temporary file in the same directory, flushed, fsynced and renamed over the target.
`RunLock` is an exclusive, non-blocking `flock` on RUN/.lock, held for a job's lifetime and
released by the operating system when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from lmcore.errors import InputError

LOCK_NAME = ".lock"


class RunFolderBusy(InputError):
    """Another process holds the run folder's lock; the message names the folder and holder."""


class RunLock:
    """Exclusive lock on a run folder (RUN/.lock) for the life of one job.

    `acquire()` creates the folder if needed and fails at once with RunFolderBusy, naming
    the holder (pid, host, since), when another process holds it. Use as a context manager.
    """

    def __init__(self, run_dir: str | Path, job: str = "lmcore"):
        self.path = Path(run_dir) / LOCK_NAME
        self.job = job
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent}: the run folder is in use ({holder}); wait for that job to end "
                "or choose another run folder"
            ) from None
        os.ftruncate(fd, 0)
        info = f"{self.job}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, info.encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and flush it (a crash loses at most the line being written)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, ignoring a truncated last line (from a crash mid-write)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise InputError(f"{p}: line {i + 1} is not valid JSON")
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
