"""Notebooks executed by Papermill: one notebook with parameters, and batches over seeds
spread over the node's GPUs.

`run_notebook` executes one notebook into an output notebook, with the working directory
given to Papermill (`cwd`, by default the notebook's folder; nothing here changes this
process's working directory). `notebook_parameters` reads what a notebook declares in its
`parameters` cell.

`run_batch` (`lmcore study run`): the notebook once per seed (or once), with `seed` and
`run_dir` injected when the notebook declares them (and `num_gpus`, when it declares it and
the caller did not set it); a parameter the notebook does not declare, or a file that is
not a notebook, is refused before anything runs (`InputError`). Each execution is a job of
the GPU pool (`lmcore.study.schedule`): `python -m lmcore study execute ...` on `num_gpus`
of the pool's devices, the cells' output in <run folder>/notebook.log. The executed notebook
is saved as <run folder>/notebook.ipynb (or into out_dir). A run folder holding an earlier
run has its files moved to a backup first (`lmcore.study.folders`). A failed execution
writes <run folder>/FAILED.json and the batch goes on; the batch summary (ok / failed) is
written to runs_dir/batches/<name>-<time>.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_json
from lmcore.study.folders import clear_run
from lmcore.study.paths import LogFn, now, print_line, resolve, root_of, say_to
from lmcore.study.schedule import Job, run_pool

__all__ = ["notebook_error", "notebook_parameters", "parse_param", "run_batch", "run_notebook"]


def parse_param(value: str) -> Any:
    """A Papermill parameter from the command line: JSON when it parses, else the string."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares (Papermill's inspection of its `parameters` cell).
    InputNotFound for a missing file, InputError for one that is not a Jupyter notebook."""
    import nbformat
    import papermill as pm

    nb = Path(notebook)
    try:
        data = json.loads(nb.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise InputNotFound(f"notebook not found: {nb}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not a Jupyter notebook: {nb} (not JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("nbformat"), int):
        raise InputError(f"not a Jupyter notebook: {nb} (JSON without an nbformat version)")
    try:
        return dict(pm.inspect_notebook(str(nb)))
    except nbformat.ValidationError as e:
        raise InputError(f"not a valid Jupyter notebook: {nb} ({str(e).splitlines()[0]})") from None


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any] | None = None,
    *,
    cwd: str | Path | None = None,
    kernel_name: str | None = None,
    stream: bool = True,
) -> Path:
    """Execute `notebook` with Papermill into `output`, the kernel working in `cwd`
    (default: the notebook's folder); the cells' output is streamed to this process's
    stdout/stderr when `stream`. Raises on a failing cell (the partly executed notebook is
    still written)."""
    import papermill as pm

    nb = Path(notebook).resolve()
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(nb),
        str(out),
        parameters=dict(parameters or {}),
        kernel_name=kernel_name,
        cwd=str(Path(cwd).resolve() if cwd is not None else nb.parent),
        progress_bar=False,
        log_output=False,
        stdout_file=sys.stdout if stream else None,
        stderr_file=sys.stderr if stream else None,
    )
    return out


def notebook_error(executed: Path) -> tuple[str, str] | None:
    """("ename: evalue", traceback) of the first cell error in an executed notebook, or None."""
    try:
        nb = json.loads(executed.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) or []:
            if o.get("output_type") == "error":
                return f"{o.get('ename')}: {o.get('evalue')}", "\n".join(o.get("traceback") or [])
    return None


def _find_notebook(notebook: str | Path, root: Path) -> Path:
    nb = resolve(notebook, root)
    if nb.is_file():
        return nb
    cand = Path(notebook).resolve()  # relative to the working directory, as a shell user types it
    if cand.is_file():
        return cand
    raise InputNotFound(f"notebook not found: {notebook}")


def run_batch(
    notebook: str | Path,
    *,
    parameters: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    runs_dir: str | Path = "runs",
    out_dir: str | Path | None = None,
    name: str | None = None,
    kernel_name: str | None = None,
    num_gpus: int | None = None,
    devices: Sequence[str | int] | None = None,
    heartbeat_s: float = 60.0,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> dict[str, Any]:
    """Execute `notebook` once per seed (or once without seeds), spread over `devices`.

    Run folder: runs_dir/<name>-s<seed> (runs_dir/<name> without seeds), name defaulting
    to the notebook's stem. Each execution gets `num_gpus` devices (default: the
    `num_gpus` parameter, else 1). Returns the batch summary (also written to
    runs_dir/batches/<name>-<time>.json): runs with status ok / failed. See the module
    docstring.
    """
    say = say_to(log)
    r = root_of(root)
    nb = _find_notebook(notebook, r)
    declared = notebook_parameters(nb)
    given = dict(parameters or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InputError(f"{nb}: unknown parameter(s) {', '.join(unknown)}; the notebook declares "
                         f"{', '.join(declared) or 'no parameters'}")
    gpus = int(num_gpus if num_gpus is not None else given.get("num_gpus", 1))
    base_name = name or nb.stem
    runs = resolve(runs_dir, r)
    outs = resolve(out_dir, r) if out_dir is not None else None
    plan: list[tuple[str, int | None]] = [(f"{base_name}-s{int(s)}", int(s)) for s in seeds] if seeds else [
        (base_name, None)]
    started = now()
    jobs, entries = [], []
    for run_name, seed in plan:
        rd = runs / run_name
        out_nb = (outs / f"{run_name}.ipynb") if outs is not None else (rd / "notebook.ipynb")
        clear_run(rd, say, markers=("summary.json", "eval.json", "notebook.ipynb"), keep=(),
                  extra=[out_nb] if outs is not None else [])
        rd.mkdir(parents=True, exist_ok=True)
        params = dict(given)
        if seed is not None:
            if "seed" in declared:
                params["seed"] = seed
            else:
                say(f"warning: {nb.name} has no `seed` parameter; seed {seed} only names the run folder")
        if "run_dir" in declared and "run_dir" not in given:
            params["run_dir"] = str(rd)
        if "num_gpus" in declared and "num_gpus" not in given:
            params["num_gpus"] = gpus
        cmd = [sys.executable, "-m", "lmcore", "study", "execute", str(nb), str(out_nb), "--params",
               json.dumps(params), "--cwd", str(nb.parent), *(["--kernel", kernel_name] if kernel_name else [])]
        jobs.append(Job(run_name, cmd, rd / "notebook.log", num_gpus=gpus))
        entries.append({"name": run_name, "seed": seed, "run_dir": str(rd), "notebook": str(out_nb),
                        "parameters": params})
    results = run_pool(jobs, devices=devices, cwd=r, log=log, heartbeat_s=heartbeat_s)
    for entry, res in zip(entries, results):
        entry.update(status=res.status, time_s=round(res.elapsed_s, 3), devices=res.devices)
        if res.status == "failed":
            entry["error"] = _record_failure(nb, entry, res.error or "failed")
    summary = {
        "notebook": str(nb), "name": base_name, "started": started, "finished": now(), "parameters": given,
        "seeds": list(seeds) if seeds else None, "num_gpus": gpus,
        "ok": [e["name"] for e in entries if e["status"] == "ok"],
        "failed": [e["name"] for e in entries if e["status"] == "failed"],
        "runs": entries,
    }
    path = runs / "batches" / f"{base_name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(path, summary)
    summary["summary_path"] = str(path)
    say(f"batch {base_name}: {len(summary['ok'])} ok, {len(summary['failed'])} failed; summary {path}")
    return summary


def _record_failure(nb: Path, entry: dict[str, Any], pool_error: str) -> str:
    """FAILED.json of a failed execution: the notebook's error (the first failing cell's),
    kept beside what the run itself recorded (a phase's FAILED.json); returns the error."""
    rd, out_nb = Path(entry["run_dir"]), Path(entry["notebook"])
    found = notebook_error(out_nb)
    error, tb = found if found is not None else (pool_error, None)
    prev: dict[str, Any] = {}
    try:
        prev = json.loads((rd / "FAILED.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    failed = {**prev, "error": prev.get("error") or error, "notebook_error": error, "notebook": str(out_nb),
              "source_notebook": str(nb), "parameters": entry["parameters"], "seed": entry["seed"],
              "log": str(rd / "notebook.log"), "time": now()}
    if "traceback" not in prev:
        failed["traceback"] = tb
    atomic_write_json(rd / "FAILED.json", failed)
    return error
