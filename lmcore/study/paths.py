"""Where the study runs: the repository root, paths resolved against it, the time stamps and
log callbacks of the study layer, and a description of the machine.

Notebooks run with the notebook's folder as the working directory (nbval and Papermill both
do). Nothing here changes the working directory: every relative path (run folders, data,
notebooks, figures) is resolved against the repository root explicitly, and the work that
needs the root as its working directory (training, packing) runs in a subprocess started
there (`lmcore.study.run`). `repo_root()` walks up from the working directory to the
`pyproject.toml` of lmcore, else takes the checkout holding this package.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable
from pathlib import Path

import pandas as pd

__all__ = ["LogFn", "environment", "now", "repo_root", "resolve", "root_of", "say_to"]

LogFn = Callable[[str], None]


def _is_lmcore_root(d: Path) -> bool:
    pp = d / "pyproject.toml"
    if not (pp.is_file() and (d / "lmcore").is_dir()):
        return False
    try:
        return 'name = "lmcore"' in pp.read_text(encoding="utf-8")
    except OSError:
        return False


def repo_root(start: str | Path | None = None) -> Path:
    """The lmcore checkout: walk up from `start` (default: the working directory) to the
    folder whose pyproject.toml names lmcore; else the checkout holding this package; else
    `start` itself."""
    here = Path(start).resolve() if start is not None else Path.cwd().resolve()
    for d in (here, *here.parents):
        if _is_lmcore_root(d):
            return d
    pkg_root = Path(__file__).resolve().parents[2]
    if _is_lmcore_root(pkg_root):
        return pkg_root
    return here


def root_of(root: str | Path | None) -> Path:
    """`root` as an absolute path, or the repository root when None."""
    return Path(root).resolve() if root is not None else repo_root()


def resolve(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` as an absolute path, relative ones taken from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (root_of(root) / p).resolve()


def now() -> str:
    """The local time, ISO 8601 to the second, with its UTC offset."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def print_line(msg: str) -> None:
    print(msg, flush=True)


def say_to(log: LogFn | None) -> LogFn:
    """`log`, or a callback that drops the message when it is None."""
    return log if log is not None else (lambda s: None)


def environment(root: str | Path | None = None) -> pd.DataFrame:
    """Where this runs: repository root, Python, torch, device, GPUs, cores, attention backends."""
    import os  # cpu_count only

    import torch

    from lmcore.attention import available_backends

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [
        ("repository root", str(root_of(root))),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("device", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"),
        ("gpus", torch.cuda.device_count() if dev == "cuda" else 0),
        ("cpu cores", os.cpu_count()),
    ]
    for name, state in available_backends(dev).items():
        rows.append((f"attention {name}", state))
    return pd.DataFrame(rows, columns=["what", "value"])
