"""Sweeps: many independent runs of one study spread over the node's GPUs, and eval-only
sweeps of one packed model.

`sweep(study, variants, ...)`: one run per variant and seed (the variant's overrides on top
of `overrides`) in runs_dir/<study>/<variant>-s<seed>. The configs are checked and the data
prepared here first (a bad config is recorded as failed and never started); then each run
is a job of the GPU pool (`lmcore.study.schedule.run_pool`): `python -m lmcore study run-one
...` in a subprocess on `num_gpus` of the pool's `devices`, its output in RUN/run.log. A
failed run is recorded (FAILED.json, its row says failed) and the others go on. Returns the
runs' DataFrame in sweep order.

`attention_sweep`: a run per attention backend; a backend that cannot run here is not run:
its folder holds only study.json with status "unavailable" and the reason from
`lmcore.attention.available_backends`.

`eval_sweep(run_dir, variants, ...)`: each variant's eval.* overrides evaluated on the run's
existing packed model (model.int6.ptz) into RUN/eval-<variant>.json, as pool jobs (`python -m
lmcore eval --output eval-<variant>.json --set ...`); never trains or packs. Returns the
run's `eval_table`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.config import Config
from lmcore.errors import InputError, InputNotFound
from lmcore.study.folders import clear_run, record_failure, set_aside, update_study
from lmcore.study.paths import LogFn, print_line, resolve, root_of, say_to
from lmcore.study.results import eval_table, load_runs
from lmcore.study.run import (
    IF_EXISTS,
    check_sections,
    eval_file,
    eval_settings,
    evaluated_with,
    lmcore_command,
    make_config,
    prepare_data,
    run_config,
    set_args,
)
from lmcore.study.schedule import Job, run_pool

__all__ = ["attention_sweep", "eval_sweep", "field_variants", "run_command", "run_jobs", "runs_read_back", "sweep",
           "sweep_job", "variant_dir"]


def field_variants(field: str, values: Iterable[Any], *, named: bool = False) -> dict[str, list[str]]:
    """{value: ["field=value"]} for a one-field sweep, e.g. field_variants("model.bigram", [...]);
    with `named` the keys say the field too ("ttt_lr-0.001"), to merge sweeps of several fields."""
    out: dict[str, list[str]] = {}
    for v in values:
        text = ",".join(str(i) for i in v) if isinstance(v, (list, tuple)) else str(v)
        out[f"{field.split('.')[-1]}-{text}" if named else text] = [f"{field}={text}"]
    return out


def variant_dir(runs_dir: Path, study: str, variant: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.," else "_" for c in str(variant))
    return runs_dir / study / f"{safe}-s{seed}"


def run_command(run_dir: Path, *, preset: str, overrides: Sequence[str], seed: int | None,
                pack_overrides: Sequence[str], eval_overrides: Sequence[str], ttt: bool | None, num_gpus: int,
                study: str | None, variant: str | None, pack: bool, evaluate: bool, if_exists: str,
                progress: bool) -> list[str]:
    """The command line of one run (`lmcore study run-one`), as a pool job runs it."""
    cmd = [sys.executable, "-m", "lmcore", "study", "run-one", "--run-dir", str(run_dir), "--preset", preset,
           "--num-gpus", str(int(num_gpus)), "--if-exists", if_exists, *set_args(overrides)]
    cmd += [a for o in pack_overrides for a in ("--pack-set", o)]
    cmd += [a for o in eval_overrides for a in ("--eval-set", o)]
    if seed is not None:
        cmd += ["--seed", str(int(seed))]
    if ttt is not None:
        cmd.append("--ttt" if ttt else "--no-ttt")
    for flag, value in (("--study", study), ("--variant", variant)):
        if value is not None:
            cmd += [flag, value]
    cmd += [flag for flag, on in (("--no-pack", not pack), ("--no-eval", not evaluate), ("--no-progress", not progress))
            if on]
    return cmd


def sweep(
    study: str,
    variants: dict[str, Sequence[str]],
    *,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    pack_overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
    ttt: bool | None = None,
    seeds: Sequence[int] = (1337,),
    runs_dir: str | Path = "runs",
    num_gpus: int = 1,
    devices: Sequence[str | int] | None = None,
    pack: bool = True,
    evaluate: bool = True,
    if_exists: str = "replace",
    progress: bool = True,
    heartbeat_s: float = 60.0,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> pd.DataFrame:
    """One run per variant and seed, spread over `devices` (default: the node's GPUs, one
    slot on a CPU), `num_gpus` each; see the module docstring. Returns the runs' DataFrame
    (`load_runs`), in sweep order."""
    if if_exists not in IF_EXISTS:
        raise InputError(f"if_exists={if_exists!r}: expected replace, reuse or error")
    r = root_of(root)
    base = resolve(runs_dir, r)
    order: list[Path] = []
    jobs: list[Job] = []
    data: dict[tuple[str, str], BaseException | None] = {}
    for variant, extra in variants.items():
        for seed in seeds:
            rd, job = sweep_job(base, study, variant, int(seed), preset=preset, overrides=[*overrides, *extra],
                                pack_overrides=pack_overrides, eval_overrides=eval_overrides, ttt=ttt,
                                num_gpus=num_gpus, pack=pack, evaluate=evaluate, if_exists=if_exists,
                                progress=progress, data=data, root=r, log=log)
            order.append(rd)
            if job is not None:
                jobs.append(job)
    run_jobs(jobs, devices=devices, cwd=r, log=log, heartbeat_s=heartbeat_s)
    return runs_read_back(base, order, f"sweep {study}", log)


def run_jobs(jobs: list[Job], *, devices: Sequence[str | int] | None, cwd: Path, log: LogFn | None,
             heartbeat_s: float) -> None:
    """Run the sweep jobs on the GPU pool; a failed run's study.json says "failed"."""
    results = run_pool(jobs, devices=devices, cwd=cwd, log=log, heartbeat_s=heartbeat_s) if jobs else []
    for job, res in zip(jobs, results):
        if res.status == "failed":
            update_study(job.log_file.parent, status="failed")


def runs_read_back(base: Path, order: list[Path], label: str, log: LogFn | None) -> pd.DataFrame:
    """The runs' DataFrame (`load_runs`, in `order`), their statuses counted in one line."""
    df = load_runs(base, runs=order)
    say_to(log)(f"{label}: " + ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items()))
    return df


def sweep_job(
    base: Path, study: str, variant: str, seed: int, *, preset: str, overrides: Sequence[str],
    pack_overrides: Sequence[str], eval_overrides: Sequence[str], ttt: bool | None, num_gpus: int, pack: bool,
    evaluate: bool, if_exists: str, progress: bool, data: dict[tuple[str, str], BaseException | None], root: Path,
    log: LogFn | None,
) -> tuple[Path, Job | None]:
    """One run of a sweep: its folder (base/study/variant-sSEED) and its pool job, or None
    when its config or data is bad (then recorded as failed in the folder). The data is
    prepared once per (data_dir, tokenizer) of `data`, which remembers the outcome."""
    rd = variant_dir(base, study, variant, seed)
    ov = list(overrides)
    try:
        check_sections(pack_overrides, "pack")
        check_sections(eval_overrides, "eval")
        cfg = make_config(preset, overrides=ov, seed=seed)
        key = (cfg.data.data_dir, cfg.data.tokenizer)
        if key not in data:
            data[key] = _prepared(cfg, root, progress)
        if data[key] is not None:
            raise data[key]  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - recorded in the run folder, the sweep goes on
        rd.mkdir(parents=True, exist_ok=True)
        if if_exists == "replace":
            clear_run(rd, log)
        update_study(rd, study=study, variant=variant, preset=preset, overrides=ov, seed=seed, num_gpus=int(num_gpus))
        record_failure(rd, "config/data", e)
        say_to(log)(f"{study}/{rd.name}: FAILED before it started: {type(e).__name__}: {e}")
        return rd, None
    if if_exists == "replace":
        clear_run(rd, log)
    rd.mkdir(parents=True, exist_ok=True)
    update_study(rd, study=study, variant=variant, preset=preset, overrides=ov, seed=seed, num_gpus=int(num_gpus),
                 status="queued")
    cmd = run_command(rd, preset=preset, overrides=ov, seed=seed, pack_overrides=pack_overrides,
                      eval_overrides=eval_overrides, ttt=ttt, num_gpus=num_gpus, study=study, variant=variant,
                      pack=pack, evaluate=evaluate, if_exists=if_exists, progress=progress)
    return rd, Job(f"{study}/{rd.name}", cmd, rd / "run.log", num_gpus=num_gpus, failed_file=rd / "FAILED.json",
                   info={"phase": "run"})


def _prepared(cfg: Config, root: Path, progress: bool) -> BaseException | None:
    try:
        prepare_data(cfg, root=root, progress=progress)
    except Exception as e:  # noqa: BLE001 - every run of this data records it
        return e
    return None


def attention_device(cfg: Config) -> str:
    """The device training will use for `cfg` ("cuda" or "cpu")."""
    import torch

    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if cfg.train.device.startswith("cuda") else "cpu"


def attention_sweep(
    backends: Sequence[str] = ("fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa"),
    *,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1337,),
    runs_dir: str | Path = "runs",
    if_exists: str = "replace",
    root: str | Path | None = None,
    log: LogFn | None = print_line,
    **sweep_kw: Any,
) -> pd.DataFrame:
    """The attention-backend ablation: a run per available backend (a `sweep` named
    "attention"; `sweep_kw` go to it: num_gpus, devices, evaluate, ...); an unavailable one
    is recorded (status "unavailable", the reason from `available_backends`), never run."""
    from lmcore.attention import available_backends

    say = say_to(log)
    dev = attention_device(make_config(preset, overrides=overrides))
    avail = available_backends(dev)
    base = resolve(runs_dir, root)
    order: list[Path] = []
    runnable: dict[str, list[str]] = {}
    for b in backends:
        state = avail.get(b, f"unknown backend (known: {', '.join(avail)})")
        for seed in seeds:
            rd = variant_dir(base, "attention", b, int(seed))
            order.append(rd)
            if state != "available":
                say(f"attention: {b} is unavailable on {dev}: {state}")
                rd.mkdir(parents=True, exist_ok=True)
                clear_run(rd, log)
                update_study(rd, study="attention", variant=b, preset=preset, overrides=list(overrides),
                             seed=int(seed), attention=b, status="unavailable", reason=state, device=dev)
        if state == "available":
            runnable[b] = [f"model.attention={b}"]
    if runnable:
        sweep("attention", runnable, preset=preset, overrides=overrides, seeds=seeds, runs_dir=base,
              if_exists=if_exists, root=root, log=log, **sweep_kw)
    return load_runs(base, runs=order)


def eval_sweep(
    run_dir: str | Path,
    variants: dict[str, Sequence[str]],
    *,
    ttt: bool | None = None,
    num_gpus: int = 1,
    devices: Sequence[str | int] | None = None,
    if_exists: str = "replace",
    progress: bool = True,
    heartbeat_s: float = 60.0,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> pd.DataFrame:
    """Evaluate the run's packed model once per variant ({name: eval.* overrides}) into
    RUN/eval-<name>.json, spread over `devices`; never trains or packs. Every variant is
    checked before any runs (a non-eval field or a bad value: InputError naming it).
    `if_exists`: "replace" moves an earlier eval-<name>.json to a backup first, "reuse"
    keeps one made with the same eval config. A failed variant writes
    FAILED-eval-<name>.json and the others go on. Returns `eval_table(run_dir)`."""
    if if_exists not in ("replace", "reuse"):
        raise InputError(f"if_exists={if_exists!r}: expected replace or reuse")
    say = say_to(log)
    r = root_of(root)
    rd = resolve(run_dir, r)
    if not (rd / "model.int6.ptz").is_file():
        raise InputNotFound(f"{rd / 'model.int6.ptz'}: packed model not found (train and pack the run first)")
    planned = []
    for name, extra in variants.items():
        output = eval_file(name)
        ov = eval_settings(extra, ttt)
        run_config(rd).override(ov)
        planned.append((name, output, ov))
    jobs: list[Job] = []
    for name, output, ov in planned:
        if if_exists == "reuse" and evaluated_with(rd, ov, name):
            say(f"eval-{name}: reusing {rd / output} (same eval config)")
            continue
        set_aside(rd, [rd / output, rd / f"FAILED-{output}"], f"an earlier evaluation {name!r}", log)
        cmd = lmcore_command(num_gpus, "eval", "--run-dir", str(rd), "--output", output, *set_args(ov),
                             *([] if progress else ["--no-progress"]))
        jobs.append(Job(f"eval-{name}", cmd, rd / f"eval-{name}.log", num_gpus=num_gpus,
                        failed_file=rd / f"FAILED-{output}", info={"phase": "eval", "variant": name, "overrides": ov}))
    results = run_pool(jobs, devices=devices, cwd=r, log=log, heartbeat_s=heartbeat_s) if jobs else []
    by_job = {j.name: (j, res) for j, res in zip(jobs, results)}
    evals = {}
    for name, _output, ov in planned:
        if f"eval-{name}" in by_job:
            res = by_job[f"eval-{name}"][1]
            evals[name] = {"overrides": ov, "status": res.status, "time_s": round(res.elapsed_s, 3),
                           "devices": res.devices}
    if evals:
        update_study(rd, evals=evals)
    return eval_table(rd)
