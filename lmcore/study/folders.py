"""A run folder's bookkeeping: study.json (what the study layer ran there and how it went),
FAILED.json (the phase that failed, its error and traceback), and the backups that keep an
earlier run when a new one replaces it.

Replacing a run. A run folder that already holds a finished run (summary.json or eval.json;
for a notebook batch also notebook.ipynb) is never overwritten in place: before the new run
starts, `clear_run` says which run it holds (status, score, date) and moves its files into
RUN/replaced-YYYYmmdd-HHMMSS/. A failure then leaves FAILED.json beside that backup, a success
the new results beside it; `find_runs` and `expand_runs` skip backups. An unfinished run's
files are deleted instead. An eval-only variant (eval-NAME.json) that is evaluated again has
its earlier file moved the same way (`set_aside`).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.runs import LOCK_NAME, atomic_write_json
from lmcore.study.paths import LogFn, now, say_to
from lmcore.study.results import BACKUP_PREFIX, load_run

__all__ = [
    "RUN_DIRS",
    "RUN_FILES",
    "clear_run",
    "read_study",
    "record_failure",
    "set_aside",
    "update_study",
]

# Files of an unfinished run that `clear_run` deletes (a finished run is moved aside
# instead). The executed notebook, notebook.ipynb, is kept: Papermill may be writing it.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.pt", "model.int6.ptz", "pack.json",
             "eval.json", "study.json", "FAILED.json")
RUN_DIRS = ("checkpoints",)
FINISHED = ("summary.json", "eval.json")


def read_study(run_dir: Path) -> dict[str, Any]:
    """study.json of a run folder ({} when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "study.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def update_study(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into study.json (its "phases" and "evals" dicts key by key)."""
    st = read_study(run_dir)
    for key in ("phases", "evals"):
        merged = dict(st.get(key, {}))
        merged.update(fields.pop(key, {}) or {})
        st[key] = merged
    st.update(fields)
    st["updated"] = now()
    atomic_write_json(Path(run_dir) / "study.json", st)
    return st


def _backup_dir(run_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup, n = run_dir / f"{BACKUP_PREFIX}{stamp}", 1
    while backup.exists():
        n += 1
        backup = run_dir / f"{BACKUP_PREFIX}{stamp}-{n}"
    return backup


def set_aside(run_dir: Path, files: Sequence[Path], what: str, log: LogFn | None) -> Path | None:
    """Move `files` (those that exist) into a new RUN/replaced-YYYYmmdd-HHMMSS/, saying so
    (`what` names what they hold); returns the backup folder, None when nothing existed."""
    found = [Path(f) for f in files if Path(f).exists()]
    if not found:
        return None
    backup = _backup_dir(run_dir)
    when = _dt.datetime.fromtimestamp(max(f.stat().st_mtime for f in found)).strftime("%Y-%m-%d %H:%M:%S")
    say_to(log)(f"{run_dir} holds {what} (written {when}): moving its files to {backup}/ before the new run "
                f"starts; the new results (or the failure) go to {run_dir}")
    backup.mkdir(parents=True)
    for f in found:
        shutil.move(f, backup / f.name)
    return backup


def finished_files(run_dir: Path, markers: Sequence[str] = FINISHED, keep: Sequence[str] = ("notebook.ipynb",),
                   extra: Sequence[Path] = ()) -> list[Path]:
    """The files to move aside when `run_dir` holds a finished run (a file of `markers`, or
    one of `extra`): all its own files and folders but `keep` and backups; [] otherwise."""
    extra_found = [Path(e) for e in extra if Path(e).is_file()]
    if not run_dir.is_dir() or not ([m for m in markers if (run_dir / m).is_file()] or extra_found):
        return []
    own = [f for f in run_dir.iterdir()
           if (f.is_file() or f.name in RUN_DIRS) and f.name not in keep and f.name != LOCK_NAME]
    return own + extra_found


def describe_run(run_dir: Path) -> str:
    """'an earlier run (status ok, val_bpb 2.0000 from eval ...)' for the set-aside message."""
    row = load_run(run_dir)
    score = f"val_bpb {row['val_bpb']:.4f} from {row['score_source']}" if row["val_bpb"] is not None else "no score"
    return f"an earlier run (status {row['status']}, {score})"


def clear_run(run_dir: Path, log: LogFn | None = None, markers: Sequence[str] = FINISHED,
              keep: Sequence[str] = ("notebook.ipynb",), extra: Sequence[Path] = ()) -> Path | None:
    """Make room for a new run: a finished one is moved aside (returns the backup), the
    files of an unfinished one are deleted."""
    files = finished_files(run_dir, markers, keep, extra)
    backup = set_aside(run_dir, files, describe_run(run_dir), log) if files else None
    for f in RUN_FILES:
        if f not in keep:
            (run_dir / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        if (run_dir / d).is_dir():
            shutil.rmtree(run_dir / d)
    return backup


def failure_info(phase: str, err: BaseException | str, **extra: Any) -> dict[str, Any]:
    """What FAILED.json holds: phase, time, error (one line) and the traceback."""
    info: dict[str, Any] = {"phase": phase, "time": now()}
    if isinstance(err, BaseException):
        info["error"] = f"{type(err).__name__}: {err}"
        info["traceback"] = "".join(traceback.format_exception(err))
    else:
        info["error"] = str(err)
    info.update(extra)
    return info


def record_failure(run_dir: Path, phase: str, err: BaseException | str, **extra: Any) -> None:
    """Write RUN/FAILED.json and mark study.json failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "FAILED.json", failure_info(phase, err, **extra))
    update_study(run_dir, status="failed", failed_phase=phase)
