"""The study layer: runs end to end, ablation sweeps, seed batches, Papermill batch
execution of the notebooks, the smoke study, and the `lmcore study` command.

Paths. Notebooks run with the notebook's folder as the working directory (nbval and
Papermill both do), so every function here resolves relative paths (run folders, data,
tokenizers, figures) against the repository root: `repo_root()` walks up from the
working directory to the `pyproject.toml` of lmcore (else the checkout holding this
package), and the work runs inside `contextlib.chdir(root)`, exactly as the command line
would from the root. Returned paths are absolute.

One run (`run_one`, or its phases `prepare_data`, `train_phase`, `pack_phase`,
`eval_phase`): data (the offline smoke corpus for the smoke data paths, else a check of
the shards), train, pack, evaluate, each timed into the run folder's `study.json`
(study, variant, preset, overrides, seed, phases, status). With num_gpus > 1 training and
evaluation run as `torchrun --standalone --nproc_per_node=N -m lmcore ...` subprocesses
(launched as `python -m torch.distributed.run`, which is torchrun) whose output is
streamed line by line, and packing as a `python -m lmcore pack` subprocess: a notebook
kernel never hosts ranks. A failed phase writes FAILED.json (phase, error, traceback).

Replacing a run. A run folder that already holds a finished run (summary.json or
eval.json; for a batch also notebook.ipynb) is never overwritten in place: before the new
run starts, the study layer says which run it holds (status, score, date) and moves its
files into RUN/replaced-YYYYmmdd-HHMMSS/. A failure then leaves FAILED.json beside that
backup, a success the new results beside it; `plots.find_runs` and `expand_runs` skip
backups. This is `if_exists="replace"` of the phase runners and every `run_batch`;
"reuse" keeps a finished run with the same config, "error" lets train refuse.

Sweeps (`sweep`, `attention_sweep`): one run per variant and seed in
runs_dir/<study>/<variant>-s<seed>. An attention backend that cannot run here is not
run: its folder holds only study.json with status "unavailable" and the reason from
`lmcore.attention.available_backends`.

Batches (`run_batch`, `lmcore study run`): the notebook is executed by Papermill once
per seed (or once), with `seed` and `run_dir` injected when the notebook declares them;
a parameter the notebook does not declare, or a file that is not a notebook, is refused
before anything runs (`InputError`). The executed notebook is saved as <run
folder>/notebook.ipynb (or into --out-dir). A failed execution writes <run
folder>/FAILED.json and the batch goes on; the batch summary (ok / failed) is written to
runs_dir/batches/<name>-<time>.json.

Seeds (`seeds_table`, `seeds_bars`): the runs' scores and both significance bars of SPEC
section 0, the README's (0.005 nats, p < 0.01) and the maintainers' practice (p < 0.25
against the previous frontier row), from `lmcore.stats.challenge_bars`.

Bad input (a parameter, a notebook, a run folder, a reference) raises
`lmcore.errors.InputError` / `InputNotFound`, which the command line prints as one line.

The smoke study (`smoke_study`, `lmcore study smoke`, `make smoke`): 01_train, the bigram
ablation and 06_figures executed by Papermill into runs/smoke, figures into figures/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import json
import math
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore import plots
from lmcore.config import Config, is_smoke_config
from lmcore.config import preset as make_preset
from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_json
from lmcore.stats import (
    CHALLENGE_ALPHA,
    CHALLENGE_MIN_IMPROVEMENT_NATS,
    WelchResult,
    bpb_to_nats,
    challenge_bars,
    challenge_test,
    mean_std,
)

__all__ = [
    "SMOKE_STUDY_OVERRIDES",
    "at_root",
    "attention_sweep",
    "environment",
    "eval_phase",
    "expand_runs",
    "field_variants",
    "make_config",
    "pack_phase",
    "parse_param",
    "prepare_data",
    "reference_runs",
    "register_cli",
    "repo_root",
    "resolve",
    "run_batch",
    "run_notebook",
    "run_one",
    "run_table",
    "seed_runs",
    "seeds_bars",
    "seeds_summary",
    "seeds_table",
    "seeds_test",
    "smoke_study",
    "sweep",
    "train_phase",
    "welch_table",
]

LogFn = Callable[[str], None]

# Files of an unfinished run that `if_exists="replace"` deletes (a finished run is moved
# aside instead: `_set_aside`). The executed notebook, notebook.ipynb, is kept: Papermill
# may be writing it while the run executes.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.pt", "model.int6.ptz", "pack.json",
             "eval.json", "study.json", "FAILED.json")
RUN_DIRS = ("checkpoints",)

# The smoke study's runs: the smoke preset, shortened so the whole study (data, train,
# pack, eval, a 3-run ablation, figures) fits in a few minutes on 2 CPU cores.
SMOKE_STUDY_OVERRIDES = [
    "train.iterations=48",
    "train.warmdown_iters=16",
    "train.batch_tokens=4096",
    "train.grad_accum=1",
    "train.val_every=12",
    "train.log_every=5",
    "train.ema=off",
    "data.val_max_tokens=4096",
    "quant.calib_seqs=2",
    "quant.calib_len=64",
    "eval.stride=64",
    "eval.ttt_chunk_tokens=1024",
]


# ---------------------------------------------------------------------------- paths


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
    pkg_root = Path(__file__).resolve().parent.parent
    if _is_lmcore_root(pkg_root):
        return pkg_root
    return here


@contextlib.contextmanager
def at_root(root: str | Path | None = None) -> Iterator[Path]:
    """Run the body with the working directory at the repository root (restored after)."""
    r = Path(root).resolve() if root is not None else repo_root()
    with contextlib.chdir(r):
        yield r


def resolve(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` as an absolute path, relative ones taken from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return ((Path(root).resolve() if root is not None else repo_root()) / p).resolve()


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _say(log: LogFn | None) -> LogFn:
    if log is None:
        return lambda s: None
    return log


def _print(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- one run


def make_config(preset: str = "smoke", overrides: Sequence[str] = (), seed: int | None = None) -> Config:
    """A preset with `overrides` ("section.field=value") and the seed applied."""
    ov = list(overrides)
    if seed is not None:
        ov.append(f"train.seed={int(seed)}")
    return make_preset(preset, ov)


def _run_overrides(overrides: Sequence[str], seed: int | None) -> list[str]:
    ov = list(overrides)
    if seed is not None:
        ov.append(f"train.seed={int(seed)}")
    return ov


def environment(root: str | Path | None = None) -> pd.DataFrame:
    """Where this runs: repository root, Python, torch, device, cores, attention backends."""
    import os as _os  # cpu_count only

    import torch

    from lmcore.attention import available_backends

    r = Path(root).resolve() if root is not None else repo_root()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [
        ("repository root", str(r)),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("device", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"),
        ("gpus", torch.cuda.device_count() if dev == "cuda" else 0),
        ("cpu cores", _os.cpu_count()),
    ]
    for name, state in available_backends(dev).items():
        rows.append((f"attention {name}", state))
    return pd.DataFrame(rows, columns=["what", "value"])



def prepare_data(cfg: Config, root: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the offline smoke corpus when `cfg` uses the smoke data paths, else check the
    shards of cfg.data.data_dir; returns what was found (and the time it took)."""
    t0 = time.perf_counter()
    with at_root(root) as r:
        if is_smoke_config(cfg):
            from lmcore.smoke_data import ensure_smoke_data

            info = dict(ensure_smoke_data(cfg.data.data_dir, cfg.data.tokenizer, progress=progress))
        else:
            from lmcore.data import check_dir

            info = dict(check_dir(cfg.data.data_dir, cfg.model.vocab_size))
            if not Path(cfg.data.tokenizer).is_file():
                raise InputNotFound(f"tokenizer not found: {r / cfg.data.tokenizer} (data.tokenizer)")
        info["data_dir"] = str(resolve(cfg.data.data_dir, r))
        info["time_s"] = round(time.perf_counter() - t0, 3)
    if progress:
        _print(f"data: {info['data_dir']} ready in {info['time_s']:.1f}s")
    return info


def _read_study(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "study.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _update_study(run_dir: Path, **fields: Any) -> dict[str, Any]:
    st = _read_study(run_dir)
    phases = dict(st.get("phases", {}))
    phases.update(fields.pop("phases", {}) or {})
    st.update(fields)
    st["phases"] = phases
    st["updated"] = _now()
    atomic_write_json(run_dir / "study.json", st)
    return st


def _set_aside(
    run_dir: Path,
    log: LogFn | None,
    markers: Sequence[str] = ("summary.json", "eval.json"),
    keep: Sequence[str] = ("notebook.ipynb",),
    extra: Sequence[Path] = (),
) -> Path | None:
    """When `run_dir` holds a finished run (a file of `markers`, or one of `extra`), say
    which and move its files (all but `keep`), its checkpoints and `extra` into
    run_dir/replaced-YYYYmmdd-HHMMSS/, which is returned (None: nothing to set aside)."""
    found = [run_dir / m for m in markers if (run_dir / m).is_file()] + [Path(e) for e in extra if Path(e).is_file()]
    if not found:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup, n = run_dir / f"{plots.BACKUP_PREFIX}{stamp}", 1
    while backup.exists():
        n += 1
        backup = run_dir / f"{plots.BACKUP_PREFIX}{stamp}-{n}"
    row = plots.load_run(run_dir)
    score = f"val_bpb {row['val_bpb']:.4f} from {row['score_source']}" if row["val_bpb"] is not None else "no score"
    when = _dt.datetime.fromtimestamp(max(f.stat().st_mtime for f in found)).strftime("%Y-%m-%d %H:%M:%S")
    _say(log)(f"{run_dir} holds an earlier run (status {row['status']}, {score}, written {when}): moving its "
              f"files to {backup}/ before the new run starts; the new run's results (or FAILED.json) go to {run_dir}")
    backup.mkdir(parents=True)
    own = [f for f in run_dir.iterdir() if (f.is_file() or f.name in RUN_DIRS) and f.name not in keep]
    for f in [*own, *(Path(e) for e in extra if Path(e).is_file())]:
        shutil.move(f, backup / f.name)
    return backup


def _clear_run(run_dir: Path, log: LogFn | None = None) -> None:
    """Make room for a new run: a finished one is moved aside (`_set_aside`), the files of
    an unfinished one are deleted."""
    _set_aside(run_dir, log)
    for f in RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        if (run_dir / d).is_dir():
            shutil.rmtree(run_dir / d)


def _record_failure(run_dir: Path, phase: str, err: BaseException | str, extra: dict[str, Any] | None = None) -> None:
    info: dict[str, Any] = {"phase": phase, "time": _now()}
    if isinstance(err, BaseException):
        info["error"] = f"{type(err).__name__}: {err}"
        info["traceback"] = "".join(traceback.format_exception(err))
    else:
        info["error"] = str(err)
    info.update(extra or {})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "FAILED.json", info)
    _update_study(run_dir, status="failed", failed_phase=phase)


def stream_command(cmd: Sequence[str], cwd: str | Path, log: LogFn | None = _print) -> int:
    """Run `cmd`, passing each line of its output (stdout + stderr) to `log` as it comes."""
    say = _say(log)
    say("$ " + " ".join(cmd))
    with subprocess.Popen(
        list(cmd), cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip("\n"))
        return proc.wait()


def _torchrun(num_gpus: int) -> list[str]:
    # `python -m torch.distributed.run` is torchrun, with this interpreter (no PATH lookup)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(num_gpus)}"]


def _set_args(overrides: Sequence[str]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


def train_phase(
    run_dir: str | Path,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seed: int | None = None,
    num_gpus: int = 1,
    study: str | None = None,
    variant: str | None = None,
    progress: bool = True,
    if_exists: str = "replace",
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> Path:
    """Train preset + overrides (+ seed) into `run_dir`; returns the absolute run folder.

    `if_exists`: "replace" moves a finished earlier run into a backup subfolder (and
    deletes an unfinished one's files; see the module docstring), "reuse" keeps a finished
    training with the same config, "error" lets train refuse.
    With num_gpus > 1 it runs under torchrun as a subprocess, its output streamed.
    """
    if if_exists not in ("replace", "reuse", "error"):
        raise InputError(f"if_exists={if_exists!r}: expected replace, reuse or error")
    ov = _run_overrides(overrides, seed)
    cfg = make_preset(preset, ov)
    with at_root(root) as r:
        rd = resolve(run_dir, r)
        if if_exists == "reuse" and _finished_with(rd, cfg):
            _say(log)(f"train: reusing {rd} (finished, same config)")
            return rd
        if if_exists == "replace":
            _clear_run(rd, log)
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "FAILED.json").unlink(missing_ok=True)
        _update_study(rd, study=study, variant=variant, preset=preset, overrides=list(overrides),
                      seed=cfg.train.seed, num_gpus=int(num_gpus), attention=cfg.model.attention,
                      status="training", started=_now())
        t0 = time.perf_counter()
        try:
            if num_gpus > 1:
                cmd = _torchrun(num_gpus) + ["-m", "lmcore", "train", "--preset", preset, *_set_args(ov),
                                              "--run-dir", str(rd)]
                if not progress:
                    cmd.append("--no-progress")
                rc = stream_command(cmd, r, log)
                if rc != 0:
                    raise RuntimeError(f"torchrun train exited with status {rc}")
            else:
                from lmcore.train import train

                train(cfg, rd, progress=progress)
        except BaseException as e:
            _record_failure(rd, "train", e)
            raise
        _update_study(rd, status="trained", phases={"train": round(time.perf_counter() - t0, 3)})
    return rd


def _finished_with(rd: Path, cfg: Config) -> bool:
    try:
        saved = Config.load(rd / "config.json")
        summ = json.loads((rd / "summary.json").read_text())
    except (ValueError, OSError):
        return False
    return saved == cfg and bool(summ.get("completed")) and (rd / "model.pt").is_file()


def pack_phase(
    run_dir: str | Path,
    num_gpus: int = 1,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> dict[str, Any]:
    """Pack the run (model.int6.ptz + pack.json); returns pack.json. With num_gpus > 1 the
    packing runs as a `python -m lmcore pack` subprocess (the kernel stays free of CUDA)."""
    with at_root(root) as r:
        rd = resolve(run_dir, r)
        t0 = time.perf_counter()
        try:
            if num_gpus > 1:
                cmd = [sys.executable, "-m", "lmcore", "pack", "--run-dir", str(rd)]
                if not progress:
                    cmd.append("--no-progress")
                rc = stream_command(cmd, r, log)
                if rc != 0:
                    raise RuntimeError(f"lmcore pack exited with status {rc}")
                info = json.loads((rd / "pack.json").read_text())
            else:
                from lmcore.pack import pack_run

                info = pack_run(rd, progress=progress)
        except BaseException as e:
            _record_failure(rd, "pack", e)
            raise
        _update_study(rd, status="packed", phases={"pack": round(time.perf_counter() - t0, 3)})
    return info


def eval_phase(
    run_dir: str | Path,
    num_gpus: int = 1,
    ttt: bool | None = None,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> dict[str, Any]:
    """Evaluate the packed run (eval.json); returns eval.json. `ttt`: None = the config's.
    With num_gpus > 1 it runs under torchrun (`lmcore eval`), its output streamed."""
    with at_root(root) as r:
        rd = resolve(run_dir, r)
        t0 = time.perf_counter()
        try:
            if num_gpus > 1:
                cmd = _torchrun(num_gpus) + ["-m", "lmcore", "eval", "--run-dir", str(rd)]
                if ttt is False:
                    cmd.append("--no-ttt")
                elif ttt is True:
                    cmd += ["--set", "eval.ttt=true"]
                if not progress:
                    cmd.append("--no-progress")
                rc = stream_command(cmd, r, log)
                if rc != 0:
                    raise RuntimeError(f"torchrun eval exited with status {rc}")
                info = json.loads((rd / "eval.json").read_text())
            else:
                from lmcore.evaluate import eval_run

                info = eval_run(rd, ttt=ttt, progress=progress, log=_say(log))
        except BaseException as e:
            _record_failure(rd, "eval", e)
            raise
        _update_study(rd, status="ok", phases={"eval": round(time.perf_counter() - t0, 3)}, finished=_now())
    return info


def run_one(
    run_dir: str | Path,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seed: int | None = None,
    num_gpus: int = 1,
    study: str | None = None,
    variant: str | None = None,
    pack: bool = True,
    evaluate: bool = True,
    ttt: bool | None = None,
    progress: bool = True,
    if_exists: str = "replace",
    raise_errors: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> dict[str, Any]:
    """One run end to end: data, train, pack, eval. Returns the run's row (`plots.load_run`).

    With `raise_errors=False` a failure is only recorded (FAILED.json) and the row
    returned with status "failed".
    """
    with at_root(root) as r:
        rd = resolve(run_dir, r)
        try:
            try:
                cfg = make_config(preset, overrides, seed)
                t0 = time.perf_counter()
                prepare_data(cfg, r, progress=progress)
                data_s = round(time.perf_counter() - t0, 3)
            except BaseException as e:
                rd.mkdir(parents=True, exist_ok=True)
                if if_exists == "replace":
                    _clear_run(rd, log)
                _update_study(rd, study=study, variant=variant, preset=preset, overrides=list(overrides),
                              seed=seed, num_gpus=int(num_gpus))
                _record_failure(rd, "config/data", e)
                raise
            train_phase(rd, preset, overrides, seed, num_gpus, study, variant, progress, if_exists, r, log)
            _update_study(rd, phases={"data": data_s})
            if pack or evaluate:
                reuse_pack = if_exists == "reuse" and (rd / "pack.json").is_file() and (rd / "model.int6.ptz").is_file()
                if not reuse_pack:
                    pack_phase(rd, num_gpus, progress, r, log)
            if evaluate:
                if not (if_exists == "reuse" and (rd / "eval.json").is_file()):
                    eval_phase(rd, num_gpus, ttt, progress, r, log)
            else:
                _update_study(rd, status="packed" if pack else "trained", finished=_now())
        except Exception as e:
            if raise_errors:
                raise
            _say(log)(f"run {rd} FAILED: {type(e).__name__}: {e}")
        return plots.load_run(rd, rd.parent)


RUN_TABLE_FIELDS = [
    ("preset", "preset"), ("seed", "seed"), ("status", "status"), ("card", "card"),
    ("world_size", "world size"), ("attention_backend", "attention backend"), ("steps", "steps"),
    ("tokens", "tokens"), ("train_time_s", "train time (s)"), ("tokens_per_s", "tokens/s"),
    ("mean_step_ms", "mean step (ms)"), ("peak_memory_mib", "peak GPU memory (MiB)"),
    ("val_bpb_raw", "val bpb, raw weights (pre-quant)"), ("val_bpb_ema", "val bpb, EMA (pre-quant)"),
    ("model_bytes", "model bytes (int6 + Brotli)"), ("code_bytes", "code bytes"),
    ("total_bytes", "artifact bytes"), ("fits", "fits the size limit"), ("pack_time_s", "pack time (s)"),
    ("sliding_bpb", "val bpb, packed, sliding"), ("ttt_bpb", "val bpb, packed, TTT"),
    ("ttt_gain_bpb", "TTT gain (bpb)"), ("eval_time_s", "eval time (s)"), ("val_bpb", "score: val bpb"),
    ("val_loss", "score: val loss (nats)"), ("score_source", "score from"), ("error", "error"),
]


def run_table(run: str | Path | dict[str, Any], root: str | Path | None = None) -> pd.DataFrame:
    """A run's summary as a two-column table (what, value), phase times included. Sizes and
    "fits" are pack.json's; the limit they are measured against is lmcore.pack.SIZE_LIMIT."""
    from lmcore.pack import SIZE_LIMIT

    row = run if isinstance(run, dict) else plots.load_run(resolve(run, root))
    rows = [(f"fits {SIZE_LIMIT:,}" if k == "fits" else label, row.get(k))
            for k, label in RUN_TABLE_FIELDS if row.get(k) is not None]
    phases = _read_study(Path(row["path"])).get("phases", {})
    for k in ("data", "train", "pack", "eval"):
        if k in phases:
            rows.append((f"phase {k} (s, wall)", phases[k]))
    rows.insert(0, ("run folder", row["path"]))
    return pd.DataFrame(rows, columns=["what", "value"])


# ---------------------------------------------------------------------------- sweeps


def _variant_dir(runs_dir: Path, study: str, variant: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.," else "_" for c in str(variant))
    return runs_dir / study / f"{safe}-s{seed}"


def sweep(
    study: str,
    variants: dict[str, Sequence[str]],
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1337,),
    runs_dir: str | Path = "runs",
    num_gpus: int = 1,
    pack: bool = True,
    evaluate: bool = True,
    ttt: bool | None = None,
    progress: bool = True,
    if_exists: str = "replace",
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> pd.DataFrame:
    """One run per variant and seed (variant overrides on top of `overrides`), in
    runs_dir/<study>/<variant>-s<seed>; a failed run is recorded and the sweep goes on.
    Returns the runs' DataFrame (`plots.load_runs`), in sweep order."""
    say = _say(log)
    with at_root(root) as r:
        base = resolve(runs_dir, r)
        dirs = []
        n = len(variants) * len(seeds)
        i = 0
        for variant, extra in variants.items():
            for seed in seeds:
                i += 1
                rd = _variant_dir(base, study, variant, int(seed))
                say(f"=== {study} [{i}/{n}]: {variant}, seed {seed} -> {rd}")
                t0 = time.perf_counter()
                row = run_one(rd, preset, [*overrides, *extra], int(seed), num_gpus, study, variant,
                              pack, evaluate, ttt, progress, if_exists, raise_errors=False, root=r, log=log)
                say(f"=== {variant} s{seed}: {row['status']}, val_bpb {row.get('val_bpb')}, "
                    f"{time.perf_counter() - t0:.1f}s")
                dirs.append(rd)
        return plots.load_runs(base, runs=dirs)


def field_variants(field: str, values: Iterable[Any]) -> dict[str, list[str]]:
    """{value: ["field=value"]} for a one-field sweep, e.g. field_variants("model.bigram", [...])."""
    out: dict[str, list[str]] = {}
    for v in values:
        text = ",".join(str(i) for i in v) if isinstance(v, (list, tuple)) else str(v)
        out[text] = [f"{field}={text}"]
    return out


def attention_device(cfg: Config, num_gpus: int = 1) -> str:
    """The device training will use for `cfg` ("cuda" or "cpu")."""
    import torch

    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if cfg.train.device.startswith("cuda") else "cpu"


def attention_sweep(
    backends: Sequence[str] = ("fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa"),
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1337,),
    runs_dir: str | Path = "runs",
    num_gpus: int = 1,
    pack: bool = True,
    evaluate: bool = True,
    ttt: bool | None = None,
    progress: bool = True,
    if_exists: str = "replace",
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> pd.DataFrame:
    """The attention-backend ablation: a run per available backend; an unavailable one is
    recorded (status "unavailable", the reason from `available_backends`), never run."""
    from lmcore.attention import available_backends

    say = _say(log)
    cfg = make_config(preset, overrides)
    dev = attention_device(cfg, num_gpus)
    avail = available_backends(dev)
    runnable: dict[str, list[str]] = {}
    with at_root(root) as r:
        base = resolve(runs_dir, r)
        order: list[Path] = []
        for b in backends:
            state = avail.get(b, f"unknown backend (known: {', '.join(avail)})")
            for seed in seeds:
                rd = _variant_dir(base, "attention", b, int(seed))
                order.append(rd)
                if state != "available":
                    say(f"=== attention: {b} is unavailable on {dev}: {state}")
                    rd.mkdir(parents=True, exist_ok=True)
                    _clear_run(rd, log)
                    _update_study(rd, study="attention", variant=b, preset=preset, overrides=list(overrides),
                                  seed=int(seed), num_gpus=int(num_gpus), attention=b, status="unavailable",
                                  reason=state, device=dev)
            if state == "available":
                runnable[b] = [f"model.attention={b}"]
        if runnable:
            sweep("attention", runnable, preset, overrides, seeds, base, num_gpus, pack, evaluate, ttt,
                  progress, if_exists, r, log)
        return plots.load_runs(base, runs=order)


# ---------------------------------------------------------------------------- seeds


def expand_runs(patterns: str | Iterable[str | Path], root: str | Path | None = None) -> list[Path]:
    """Run folders from paths or glob patterns (relative to the repository root), in
    order, without duplicates; a glob skips backups of replaced runs. A pattern that
    matches nothing raises InputNotFound."""
    pats = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    r = Path(root).resolve() if root is not None else repo_root()
    out: list[Path] = []
    for p in pats:
        ap = resolve(p, r)
        if any(c in str(p) for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(str(ap)) if Path(h).is_dir() and not plots.is_backup(h))
        else:
            hits = [ap] if ap.is_dir() else []
        if not hits:
            raise InputNotFound(f"no run folder matches {str(p)!r} (under {r})")
        out += [h for h in hits if h not in out]
    return out


def seed_runs(
    run_dirs: Sequence[str | Path] = (),
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1, 2),
    runs_dir: str | Path = "runs",
    variant: str = "candidate",
    num_gpus: int = 1,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> list[Path]:
    """The run folders of a seed batch: `run_dirs` (paths or globs) when given, else one
    run per seed of preset + overrides, in runs_dir/seeds/<variant>-s<seed>."""
    if run_dirs:
        return expand_runs(list(run_dirs), root)
    df = sweep("seeds", {variant: []}, preset, overrides, seeds, runs_dir, num_gpus, progress=progress,
               root=root, log=log)
    return [Path(p) for p in df["path"]]


def reference_runs(
    reference_runs: Sequence[str | Path] = (),
    reference_overrides: Sequence[str] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1, 2),
    runs_dir: str | Path = "runs",
    num_gpus: int = 1,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> list[Path]:
    """The reference configuration's run folders: `reference_runs` (paths or globs) when
    given; [] when the reference is a number (`reference_loss` / `reference_bpb`); else,
    with `reference_overrides` (not None), one run per seed of preset + overrides +
    reference_overrides in runs_dir/seeds/reference-s<seed>; else []."""
    if reference_runs:
        return expand_runs(list(reference_runs), root)
    if reference_loss is not None or reference_bpb is not None or reference_overrides is None:
        return []
    df = sweep("seeds", {"reference": list(reference_overrides)}, preset, overrides, seeds, runs_dir, num_gpus,
               progress=progress, root=root, log=log)
    return [Path(p) for p in df["path"]]


SEEDS_COLUMNS = ["run", "seed", "status", "val_bpb", "val_loss", "score_source", "prequant_val_bpb",
                 "ttt_gain_bpb", "train_time_s", "total_bytes", "eval_tokens", "eval_bytes"]


def seeds_table(runs: Iterable[str | Path], root: str | Path | None = None) -> pd.DataFrame:
    """One row per run folder (paths or globs): seed, score (val_bpb / val_loss) and context."""
    dirs = expand_runs(list(runs), root)
    df = plots.load_runs(dirs[0].parent if dirs else ".", runs=dirs)
    for c in SEEDS_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[SEEDS_COLUMNS].reset_index(drop=True)


def seeds_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n of val_bpb and val_loss over the runs that have a score."""
    rows = []
    for metric in ("val_bpb", "val_loss"):
        vals = [float(v) for v in df[metric] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals:
            m, s = mean_std(vals)
            rows.append({"metric": metric, "n": len(vals), "mean": m, "std": s,
                         "min": min(vals), "max": max(vals)})
    return pd.DataFrame(rows, columns=["metric", "n", "mean", "std", "min", "max"])


def _losses(df: pd.DataFrame) -> list[float]:
    return [float(v) for v in df["val_loss"] if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _bytes_per_token(df: pd.DataFrame) -> float | None:
    ok = df[df["eval_tokens"].notna() & df["eval_bytes"].notna()]
    if ok.empty:
        return None
    return float(ok["eval_bytes"].astype(float).sum() / ok["eval_tokens"].astype(float).sum())


def _samples(
    df: pd.DataFrame,
    reference_runs: Iterable[str | Path] | None,
    reference_loss: float | Sequence[float] | None,
    reference_bpb: float | Sequence[float] | None,
    root: str | Path | None,
) -> tuple[list[float], float | list[float]]:
    """The candidate's val losses and the reference's (see `seeds_test`), in nats."""
    cand = _losses(df)
    if not cand:
        raise InputError(f"the runs {', '.join(map(str, df['run']))} have no val_loss (not trained / evaluated?)")
    if reference_runs:
        ref_df = seeds_table(reference_runs, root)
        ref: float | list[float] = _losses(ref_df)
        if not ref:
            raise InputError(f"the reference runs {', '.join(map(str, ref_df['run']))} have no val_loss "
                             "(not trained / evaluated?)")
    elif reference_loss is not None:
        ref = float(reference_loss) if isinstance(reference_loss, (int, float)) else [float(x) for x in reference_loss]
    elif reference_bpb is not None:
        bpt = _bytes_per_token(df)
        if bpt is None:
            raise InputError("reference_bpb needs eval.json (tokens, bytes) in the candidate runs to convert "
                             "bits per byte to nats per token; give reference_loss instead")
        conv = lambda b: bpb_to_nats(float(b), 1.0, bpt)
        ref = conv(reference_bpb) if isinstance(reference_bpb, (int, float)) else [conv(b) for b in reference_bpb]
    else:
        raise InputError("give a reference: reference_runs, reference_loss (nats) or reference_bpb")
    vals = [ref] if isinstance(ref, float) else ref
    if not vals or not all(math.isfinite(v) for v in vals):
        raise InputError(f"the reference needs finite values, got {ref!r}")
    return cand, ref


def seeds_test(
    df: pd.DataFrame,
    reference_runs: Iterable[str | Path] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    min_improvement: float = CHALLENGE_MIN_IMPROVEMENT_NATS,
    alpha: float = CHALLENGE_ALPHA,
    root: str | Path | None = None,
) -> WelchResult:
    """One Welch test of the runs in `df` (a `seeds_table`) against a reference, by
    default the README's bar; `seeds_bars` gives both bars the challenge applies.

    The reference is, in order of preference: run folders of the reference
    configuration (`reference_runs`), val losses in nats (`reference_loss`), or val bpb
    (`reference_bpb`, converted to nats with the candidate runs' own bytes per token on
    the same validation split). One number is a published result, taken as exact.
    """
    cand, ref = _samples(df, reference_runs, reference_loss, reference_bpb, root)
    return challenge_test(cand, ref, min_improvement=min_improvement, alpha=alpha, metric="val_loss (nats/token)")


def seeds_bars(
    df: pd.DataFrame,
    reference_runs: Iterable[str | Path] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    root: str | Path | None = None,
) -> dict[str, WelchResult]:
    """Both bars of SPEC section 0 for the runs in `df` against a reference (as in
    `seeds_test`): {"readme": 0.005 nats at p < 0.01, "practice": p < 0.25 against the
    previous frontier row, its seeds pooled with reproductions}, each one-sided Welch
    (`lmcore.stats.challenge_bars`); each result's statement names its bar."""
    cand, ref = _samples(df, reference_runs, reference_loss, reference_bpb, root)
    return challenge_bars(cand, ref, metric="val_loss (nats/token)")


def welch_table(result: WelchResult | dict[str, WelchResult]) -> pd.DataFrame:
    """A test's numbers as a table (what, value); for `seeds_bars`' dict one column per bar."""
    bars = result if isinstance(result, dict) else {"value": result}
    keys = ["metric", "n", "mean", "std", "reference_n", "reference_mean", "reference_std", "improvement",
            "min_improvement", "alpha", "t", "df", "p_value", "passed"]
    cols = {name: r.to_dict() for name, r in bars.items()}
    return pd.DataFrame([(k, *(d[k] for d in cols.values())) for k in keys], columns=["what", *cols])


# ---------------------------------------------------------------------------- Papermill


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
    cwd: str | Path | None = None,
    kernel_name: str | None = None,
    stream: bool = True,
) -> Path:
    """Execute `notebook` with Papermill into `output` (cells' output streamed to this
    process's stdout/stderr when `stream`); raises on a failing cell (the partly executed
    notebook is still written)."""
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


def run_batch(
    notebook: str | Path,
    parameters: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    runs_dir: str | Path = "runs",
    out_dir: str | Path | None = None,
    name: str | None = None,
    kernel_name: str | None = None,
    stream: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> dict[str, Any]:
    """Execute `notebook` once per seed (or once without seeds) with Papermill.

    Run folder: runs_dir/<name>-s<seed> (runs_dir/<name> without seeds), name defaulting
    to the notebook's stem. The notebook gets `seed` and `run_dir` (absolute) when it
    declares them, on top of `parameters`; a parameter it does not declare raises
    InputError before anything runs. The executed notebook is saved as
    <run folder>/notebook.ipynb, or out_dir/<run name>.ipynb. A run folder holding an
    earlier run has its files moved to a backup subfolder first (module docstring). A
    failure writes <run folder>/FAILED.json and the batch continues. Returns the batch
    summary (also written to runs_dir/batches/<name>-<time>.json): runs with status ok /
    failed.
    """
    say = _say(log)
    r = Path(root).resolve() if root is not None else repo_root()
    nb = resolve(notebook, r) if not Path(notebook).is_absolute() else Path(notebook)
    if not nb.is_file():
        # a path relative to the working directory, as a shell user would type it
        cand = Path(notebook).resolve()
        if cand.is_file():
            nb = cand
        else:
            raise InputNotFound(f"notebook not found: {notebook}")
    declared = notebook_parameters(nb)
    unknown = sorted(set(parameters or {}) - set(declared))
    if unknown:
        raise InputError(f"{nb}: unknown parameter(s) {', '.join(unknown)}; the notebook declares "
                         f"{', '.join(declared) or 'no parameters'}")
    base_name = name or nb.stem
    runs = resolve(runs_dir, r)
    outs = resolve(out_dir, r) if out_dir is not None else None
    jobs: list[tuple[str, int | None]] = (
        [(f"{base_name}-s{int(s)}", int(s)) for s in seeds] if seeds else [(base_name, None)]
    )
    started = _now()
    results = []
    for i, (run_name, seed) in enumerate(jobs, 1):
        rd = runs / run_name
        out_nb = (outs / f"{run_name}.ipynb") if outs is not None else (rd / "notebook.ipynb")
        _set_aside(rd, say, markers=("summary.json", "eval.json", "notebook.ipynb"), keep=(),
                   extra=[out_nb] if outs is not None else [])
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "FAILED.json").unlink(missing_ok=True)
        params = dict(parameters or {})
        if seed is not None:
            if "seed" in declared:
                params["seed"] = seed
            else:
                say(f"warning: {nb.name} has no `seed` parameter; seed {seed} only names the run folder")
        if "run_dir" in declared and "run_dir" not in (parameters or {}):
            params["run_dir"] = str(rd)
        say(f"=== [{i}/{len(jobs)}] {nb.name} -> {out_nb}" + (f" (seed {seed})" if seed is not None else ""))
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": run_name, "seed": seed, "run_dir": str(rd), "notebook": str(out_nb),
                                 "parameters": params}
        try:
            run_notebook(nb, out_nb, params, cwd=nb.parent, kernel_name=kernel_name, stream=stream)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - papermill's PapermillExecutionError, a dead kernel, ...
            entry["status"] = "failed"
            ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
            entry["error"] = f"{ename}: {evalue}"
            prev: dict[str, Any] = {}
            try:
                prev = json.loads((rd / "FAILED.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            failed = {**prev, "error": prev.get("error") or entry["error"], "notebook_error": entry["error"],
                      "notebook": str(out_nb), "source_notebook": str(nb), "parameters": params,
                      "seed": seed, "time": _now()}
            if "traceback" not in prev:
                failed["traceback"] = "".join(getattr(e, "traceback", None) or traceback.format_exception(e))
            atomic_write_json(rd / "FAILED.json", failed)
            say(f"=== {run_name} FAILED: {entry['error']} (recorded in {rd / 'FAILED.json'})")
        entry["time_s"] = round(time.perf_counter() - t0, 3)
        results.append(entry)
    summary = {
        "notebook": str(nb),
        "name": base_name,
        "started": started,
        "finished": _now(),
        "parameters": dict(parameters or {}),
        "seeds": list(seeds) if seeds else None,
        "ok": [e["name"] for e in results if e["status"] == "ok"],
        "failed": [e["name"] for e in results if e["status"] == "failed"],
        "runs": results,
    }
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs / "batches" / f"{base_name}-{stamp}.json"
    atomic_write_json(path, summary)
    summary["summary_path"] = str(path)
    say(f"batch {base_name}: {len(summary['ok'])} ok, {len(summary['failed'])} failed; summary {path}")
    return summary


# ---------------------------------------------------------------------------- smoke study


def smoke_study(
    runs_dir: str | Path = "runs/smoke",
    figures_dir: str | Path = "figures",
    notebooks_dir: str | Path = "notebooks",
    overrides: Sequence[str] | None = None,
    stream: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = _print,
) -> dict[str, Any]:
    """The smoke study: 01_train (data, train, pack, eval), the bigram ablation (3 runs)
    and 06_figures, each executed by Papermill with its notebook saved in its run folder.
    Returns {"figures": [paths], "notebooks": [...], "time_s": {...}}; raises on failure."""
    say = _say(log)
    r = Path(root).resolve() if root is not None else repo_root()
    ov = list(SMOKE_STUDY_OVERRIDES if overrides is None else overrides)
    runs = resolve(runs_dir, r)
    figs = resolve(figures_dir, r)
    nbs = resolve(notebooks_dir, r)
    t_all = time.perf_counter()
    steps = [
        ("train", "01_train.ipynb", runs / "train" / "notebook.ipynb",
         {"preset": "smoke", "overrides": ov, "seed": 1337, "num_gpus": 1, "run_dir": str(runs / "train")}),
        ("bigram ablation", "03_ablation_bigram.ipynb", runs / "bigram" / "notebook.ipynb",
         {"preset": "smoke", "overrides": ov, "seeds": [1337], "kinds": ["hashed", "product_key", "none"],
          "runs_dir": str(runs)}),
        ("figures", "06_figures.ipynb", runs / "figures.ipynb",
         {"runs_dir": str(runs), "figures_dir": str(figs)}),
    ]
    times: dict[str, float] = {}
    written: list[str] = []
    start_wall = time.time()
    for label, nb_name, out_nb, params in steps:
        say(f"=== smoke study: {label} ({nb_name} -> {out_nb})")
        t0 = time.perf_counter()
        try:
            run_notebook(nbs / nb_name, out_nb, params, cwd=nbs, stream=stream)
        except Exception as e:
            raise RuntimeError(
                f"smoke study: {label} failed ({getattr(e, 'ename', type(e).__name__)}: "
                f"{getattr(e, 'evalue', e)}); see the executed notebook {out_nb}"
            ) from e
        times[label] = round(time.perf_counter() - t0, 1)
        written.append(str(out_nb))
    times["total"] = round(time.perf_counter() - t_all, 1)
    figures = sorted(str(p) for p in figs.glob("*") if p.suffix in (".png", ".svg") and p.stat().st_mtime >= start_wall - 1)
    summary = {"runs_dir": str(runs), "figures_dir": str(figs), "figures": figures, "notebooks": written,
               "time_s": times, "overrides": ov, "finished": _now()}
    atomic_write_json(runs / "smoke.json", summary)
    return summary


# ---------------------------------------------------------------------------- CLI


def _cmd_run(args: argparse.Namespace) -> int:
    params = {k: parse_param(v) for k, v in (args.param or [])}
    summary = run_batch(args.notebook, params, seeds=args.seeds, runs_dir=args.runs_dir, out_dir=args.out_dir,
                        name=args.name, kernel_name=args.kernel, stream=not args.quiet)
    for e in summary["runs"]:
        print(f"{e['status']:>6}  {e['name']}  {e['notebook']}" + (f"  ({e['error']})" if e.get("error") else ""))
    return 1 if summary["failed"] else 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    s = smoke_study(runs_dir=args.runs_dir, figures_dir=args.figures_dir, stream=not args.quiet)
    print(f"smoke study done in {s['time_s']['total']:.0f}s: " + ", ".join(
        f"{k} {v:.0f}s" for k, v in s["time_s"].items() if k != "total"))
    print("executed notebooks:\n  " + "\n  ".join(s["notebooks"]))
    print(f"figures ({len(s['figures'])} files):\n  " + "\n  ".join(s["figures"]))
    print(s["figures_dir"])
    return 0


def _cmd_seeds_table(args: argparse.Namespace) -> int:
    df = seeds_table(args.run_dirs)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False))
        print()
        print(seeds_summary(df).to_string(index=False))
    if args.reference_runs or args.reference_loss is not None or args.reference_bpb is not None:
        bars = seeds_bars(df, reference_runs=args.reference_runs, reference_loss=_one_or_list(args.reference_loss),
                          reference_bpb=_one_or_list(args.reference_bpb))
        print()
        for res in bars.values():
            print(res.statement)
        print()
        print(welch_table(bars).to_string(index=False))
    return 0


def _one_or_list(v: list[float] | None) -> float | list[float] | None:
    if v is None:
        return None
    return v[0] if len(v) == 1 else v


def _cmd_figures(args: argparse.Namespace) -> int:
    if not resolve(args.runs_dir).is_dir():
        raise InputNotFound(f"runs folder not found: {resolve(args.runs_dir)} (--runs-dir)")
    res = plots.export_figures(resolve(args.runs_dir), resolve(args.out))
    made = [p for v in res.values() if not isinstance(v, str) for p in v]
    print(resolve(args.out) if made else "no figure written")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "study",
        help="notebook batches (Papermill), the smoke study, seed tables, figures",
        description="The notebook-driven study: run a notebook in batch over seeds, the CPU smoke study, "
        "seed tables with the challenge's Welch test, and the figures.",
    )
    ss = p.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    ss.required = True

    r = ss.add_parser(
        "run",
        help="execute a notebook with Papermill, once per seed; a failed run is recorded and the batch goes on",
        description="Each run's executed notebook lands in its run folder (RUNS_DIR/NAME-sSEED/notebook.ipynb); "
        "a failure writes FAILED.json there; the batch summary goes to RUNS_DIR/batches/. "
        "Exit status 1 when any run failed.",
    )
    r.add_argument("notebook", help="the notebook, e.g. notebooks/01_train.ipynb")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="a notebook parameter; VALUE is parsed as JSON when it can be (lists, numbers), "
                        "else taken as a string (repeatable)")
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (injected as `seed`)")
    r.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs, under the repo root)")
    r.add_argument("--out-dir", default=None, help="save executed notebooks here instead of in the run folders")
    r.add_argument("--name", default=None, help="run name prefix (default: the notebook's name)")
    r.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    r.add_argument("--quiet", action="store_true", help="do not stream the cells' output")
    r.set_defaults(func=_cmd_run)

    s = ss.add_parser(
        "smoke",
        help="the CPU smoke study: data, train, pack, eval, bigram ablation, figures (offline, minutes)",
        description="Executes notebooks/01_train, 03_ablation_bigram and 06_figures with Papermill on the "
        "smoke preset (shortened); executed notebooks go into the run folders under --runs-dir and "
        "the figures into --figures-dir, whose path is printed last.",
    )
    s.add_argument("--runs-dir", default="runs/smoke")
    s.add_argument("--figures-dir", default="figures")
    s.add_argument("--quiet", action="store_true", help="do not stream the cells' output")
    s.set_defaults(func=_cmd_smoke)

    t = ss.add_parser(
        "seeds-table",
        help="val_bpb / val_loss of seed runs, mean and std, and the challenge's two significance bars",
        description="Both bars, each a one-sided Welch t-test on the val loss (nats): the README's, an "
        "improvement of at least 0.005 nats with p < 0.01; the maintainers' practice since April 2026 "
        "(openai/parameter-golf #1902, #2146), any improvement with p < 0.25 against the previous frontier "
        "row, its seeds pooled with reproductions. Give the reference as run folders, losses (nats) or bpb.",
    )
    t.add_argument("run_dirs", nargs="+", help="run folders or glob patterns")
    t.add_argument("--reference-runs", nargs="+", default=None, help="run folders of the reference configuration")
    t.add_argument("--reference-loss", type=float, nargs="+", default=None, help="reference val loss(es), nats/token")
    t.add_argument("--reference-bpb", type=float, nargs="+", default=None,
                   help="reference val bpb value(s), converted to nats with the runs' bytes per token")
    t.set_defaults(func=_cmd_seeds_table)

    f = ss.add_parser("figures", help="export every figure from the runs under --runs-dir (PNG + SVG)")
    f.add_argument("--runs-dir", default="runs")
    f.add_argument("--out", default="figures")
    f.set_defaults(func=_cmd_figures)
