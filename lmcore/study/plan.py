"""A study plan: every ablation of a study in one JSON file, run as one batch on the node's
GPUs (`lmcore study plan PLAN.json`), and read back by the study's tables and figures
(`lmcore.study.report`).

The plan names the variants to train and how they group into ablations:

    {"study": "gpu", "preset": "proxy500", "overrides": [], "seeds": [1337, 42],
     "eval": {"overrides": ["eval.stride=2048"], "ttt": false},
     "variants": {"record": {"overrides": [], "seeds": [1337, 42, 2025]},
                  "bigram-none": {"overrides": ["model.bigram=none"]}},
     "ablations": {"bigram": {"title": "...", "baseline": "record", "variants": ["bigram-none"]},
                   "ema": {"title": "...", "runs": "record",
                           "columns": {"original": "val_bpb_ema_alt", "bias_corrected": "val_bpb_ema"}}},
     "metric": "prequant_val_bpb",
     "eval_sweep": {"run": "record-s1337", "variants": {"ttt-off": ["eval.ttt=false"]}}}

Each variant is trained, packed and evaluated (with "eval"; "eval": null skips it) into
RUNS_DIR/<study>/<variant>-s<seed>, its seeds the variant's own or the plan's. An ablation
either compares variants with a baseline variant, or ("columns") compares columns of the
same runs (two EMA modes of one training). "eval_sweep" evaluates one run's packed model
once per setting (`eval_sweep`), after the training batch.

`run_plan` checks the whole plan first (a bad field or override: InputError naming it), copies
it to RUNS_DIR/<study>/plan.json, then queues every run in one GPU pool, seed-major (every
variant's first seed, then every second seed, ...), so a batch cut short still holds whole
rounds of seeds. A failed run is recorded and the others go on. With if_exists="keep" every
finished run is left as it is, weights or not (the small files committed by an earlier
session), and only the others run: add seeds or variants to a plan and run it again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_json
from lmcore.study.folders import read_study
from lmcore.study.paths import LogFn, print_line, resolve, root_of, say_to
from lmcore.study.run import IF_EXISTS, check_sections, eval_settings, evaluated_with, make_config
from lmcore.study.schedule import Job
from lmcore.study.sweeps import eval_sweep, run_jobs, runs_read_back, sweep_job, variant_dir

__all__ = ["PLAN_IF_EXISTS", "Ablation", "Plan", "Variant", "finished", "load_plan", "plan_runs", "read_plan",
           "run_plan"]

# "keep": a finished run (its small files, e.g. committed from an earlier session) is left as it
# is, without its weights; an unfinished or failed one is run again from scratch
PLAN_IF_EXISTS = (*IF_EXISTS, "keep")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    baseline: str | None = None  # a variant (variants ablation) or a column label (columns ablation)
    variants: tuple[str, ...] = ()
    runs: str | None = None  # columns ablation: the variant whose runs are compared
    columns: dict[str, str] = field(default_factory=dict)  # label -> load_run column
    metric: str | None = None  # default: the plan's metric
    extra: tuple[str, ...] = ()  # further columns reported as mean +- std (e.g. tokens_per_s)


@dataclass(frozen=True)
class Plan:
    study: str
    preset: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    variants: dict[str, Variant]
    ablations: dict[str, Ablation]
    metric: str = "prequant_val_bpb"
    eval_overrides: tuple[str, ...] = ()
    eval_ttt: bool | None = None
    evaluate: bool = True
    eval_sweep_run: str | None = None
    eval_sweep_variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    eval_sweep_ttt: bool | None = None
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def seeds_of(self, variant: str) -> tuple[int, ...]:
        return self.variants[variant].seeds or self.seeds


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InputError(f"{where}: expected a list of strings, got {v!r}")
    return tuple(v)


def _ints(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: expected a non-empty list of integers, got {v!r}")
    return tuple(v)


def _keys(d: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(d))
    if missing:
        raise InputError(f"{where}: missing field {missing[0]!r}")
    return d


def read_plan(raw: dict[str, Any], source: str = "plan") -> Plan:
    """A Plan from its JSON object, every field and override checked (InputError naming it)."""
    d = _keys(raw, source, {"study", "preset", "overrides", "seeds", "eval", "variants", "ablations", "metric",
                            "eval_sweep", "description"}, {"study", "variants"})
    study = d["study"]
    if not isinstance(study, str) or not study or any(not (c.isalnum() or c in "-_.") for c in study):
        raise InputError(f"{source}: study {study!r}: expected a folder name (letters, digits, - _ .)")
    preset = d.get("preset", "smoke")
    overrides = _strs(d.get("overrides", []), f"{source}: overrides")
    seeds = _ints(d.get("seeds", [1337]), f"{source}: seeds")
    variants: dict[str, Variant] = {}
    if not isinstance(d["variants"], dict) or not d["variants"]:
        raise InputError(f"{source}: variants: expected a non-empty object")
    for name, v in d["variants"].items():
        where = f"{source}: variants.{name}"
        _keys(v, where, {"overrides", "seeds"})
        var = Variant(name, _strs(v.get("overrides", []), f"{where}.overrides"),
                      _ints(v["seeds"], f"{where}.seeds") if "seeds" in v else ())
        try:
            make_config(preset, overrides=[*overrides, *var.overrides])
        except (InputError, ValueError) as e:
            raise InputError(f"{where}: {e}") from None
        variants[name] = var
    ev = d.get("eval", {})
    evaluate = ev is not None
    ev = _keys(ev or {}, f"{source}: eval", {"overrides", "ttt"})
    eval_ov = check_sections(_strs(ev.get("overrides", []), f"{source}: eval.overrides"), "eval")
    ablations: dict[str, Ablation] = {}
    for name, a in (d.get("ablations") or {}).items():
        where = f"{source}: ablations.{name}"
        _keys(a, where, {"title", "baseline", "variants", "runs", "columns", "metric", "extra"}, {"title"})
        ab = Ablation(name, str(a["title"]), a.get("baseline"), _strs(a.get("variants", []), f"{where}.variants"),
                      a.get("runs"), dict(a.get("columns") or {}), a.get("metric"),
                      _strs(a.get("extra", []), f"{where}.extra"))
        if ab.columns:
            if ab.runs not in variants:
                raise InputError(f"{where}.runs: {ab.runs!r} is not a variant of the plan")
            if ab.baseline not in ab.columns:
                raise InputError(f"{where}.baseline: {ab.baseline!r} is not one of its columns")
        else:
            for v in (ab.baseline, *ab.variants):
                if v not in variants:
                    raise InputError(f"{where}: {v!r} is not a variant of the plan")
            if not ab.variants:
                raise InputError(f"{where}.variants: expected at least one variant besides the baseline")
        ablations[name] = ab
    es = d.get("eval_sweep")
    sweep_run, sweep_vars, sweep_ttt = None, {}, None
    if es is not None:
        _keys(es, f"{source}: eval_sweep", {"run", "variants", "ttt"}, {"run", "variants"})
        sweep_run = es["run"]
        names = {variant_dir(Path("."), study, v, s).name for v in variants for s in (variants[v].seeds or seeds)}
        if sweep_run not in names:
            raise InputError(f"{source}: eval_sweep.run: {sweep_run!r} is not one of the plan's runs "
                             f"(VARIANT-sSEED, e.g. {min(names)})")
        for n, ov in es["variants"].items():
            sweep_vars[n] = tuple(check_sections(_strs(ov, f"{source}: eval_sweep.variants.{n}"), "eval"))
        sweep_ttt = es.get("ttt")
    return Plan(study=study, preset=preset, overrides=overrides, seeds=seeds, variants=variants, ablations=ablations,
                metric=d.get("metric", "prequant_val_bpb"), eval_overrides=tuple(eval_ov), eval_ttt=ev.get("ttt"),
                evaluate=evaluate, eval_sweep_run=sweep_run, eval_sweep_variants=sweep_vars, eval_sweep_ttt=sweep_ttt,
                source=source, raw=raw)


def load_plan(path: str | Path, root: str | Path | None = None) -> Plan:
    """Read and check a plan file (InputNotFound / InputError naming the file and field)."""
    p = resolve(path, root)
    if not p.is_file():
        raise InputNotFound(f"plan not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not a JSON plan ({e})") from None
    return read_plan(raw, str(p))


def plan_runs(plan: Plan, runs_dir: Path) -> list[tuple[str, int, Path]]:
    """(variant, seed, run folder) of every run, seed-major."""
    out = []
    depth = max(len(plan.seeds_of(v)) for v in plan.variants)
    for i in range(depth):
        for v in plan.variants:
            seeds = plan.seeds_of(v)
            if i < len(seeds):
                out.append((v, seeds[i], variant_dir(runs_dir, plan.study, v, seeds[i])))
    return out


def finished(rd: Path, plan: Plan) -> bool:
    """Whether run folder `rd` holds a finished run of the plan (study.json says so, no
    FAILED.json): its small files are enough for the tables and figures."""
    want = "ok" if plan.evaluate else "packed"
    return read_study(rd).get("status") == want and not (rd / "FAILED.json").exists()


def run_plan(
    plan: Plan | str | Path,
    *,
    runs_dir: str | Path = "runs",
    devices: Sequence[str | int] | None = None,
    num_gpus: int = 1,
    if_exists: str = "replace",
    progress: bool = True,
    heartbeat_s: float = 60.0,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> pd.DataFrame:
    """Run every variant and seed of the plan in one pool, then its eval sweep; returns the
    runs' DataFrame (see the module docstring)."""
    if if_exists not in PLAN_IF_EXISTS:
        raise InputError(f"if_exists={if_exists!r}: expected {', '.join(PLAN_IF_EXISTS)}")
    r = root_of(root)
    if not isinstance(plan, Plan):
        plan = load_plan(plan, r)
    say = say_to(log)
    base = resolve(runs_dir, r)
    (base / plan.study).mkdir(parents=True, exist_ok=True)
    atomic_write_json(base / plan.study / "plan.json", plan.raw)
    data: dict[tuple[str, str], BaseException | None] = {}
    jobs: list[Job] = []
    order = []
    for variant, seed, rd in plan_runs(plan, base):
        if if_exists == "keep" and finished(rd, plan):
            say(f"{plan.study}/{rd.name}: kept (finished)")
            order.append(rd)
            continue
        rd, job = sweep_job(base, plan.study, variant, seed, preset=plan.preset,
                            overrides=[*plan.overrides, *plan.variants[variant].overrides], pack_overrides=(),
                            eval_overrides=plan.eval_overrides, ttt=plan.eval_ttt, num_gpus=num_gpus, pack=True,
                            evaluate=plan.evaluate, if_exists="replace" if if_exists == "keep" else if_exists,
                            progress=progress, data=data, root=r, log=log)
        order.append(rd)
        if job is not None:
            jobs.append(job)
    say(f"plan {plan.study}: {len(jobs)} runs queued ({len(order) - len(jobs)} failed before starting)")
    run_jobs(jobs, devices=devices, cwd=r, log=log, heartbeat_s=heartbeat_s)
    if plan.eval_sweep_run:
        rd = base / plan.study / plan.eval_sweep_run
        variants = {k: list(v) for k, v in plan.eval_sweep_variants.items()}
        keep = if_exists in ("keep", "reuse")
        if keep and all(evaluated_with(rd, eval_settings(v, plan.eval_sweep_ttt), k) for k, v in variants.items()):
            say(f"plan {plan.study}: eval sweep kept (every variant evaluated with its settings)")
        elif (rd / "model.int6.ptz").is_file():
            eval_sweep(rd, variants, ttt=plan.eval_sweep_ttt, num_gpus=num_gpus, devices=devices,
                       if_exists="reuse" if keep else "replace", progress=progress, heartbeat_s=heartbeat_s, root=r,
                       log=log)
        else:
            say(f"plan {plan.study}: eval sweep skipped: {rd} has no packed model")
    return runs_read_back(base, order, f"plan {plan.study}", log)
