"""The study layer: runs in phases, sweeps over the node's GPUs, eval-only sweeps of a packed
model, seed statistics, Papermill batches, the smoke study and the `lmcore study` command.

One module per concern; everything a notebook calls is importable from here
(`from lmcore import study; study.run_one(...)`):

- `paths`: the repository root and paths resolved against it (nothing changes the working
  directory), `environment()`.
- `run`: one run in phases, each with its own overrides: `train_phase` (any section),
  `pack_phase` (quant.*), `eval_phase` (eval.*; with `name`, an eval-only variant
  eval-NAME.json of the existing packed model), chained by `run_one`.
- `schedule`: the GPU pool, `run_pool`: jobs on k GPUs each via CUDA_VISIBLE_DEVICES, queued
  until GPUs free up, failures recorded, live progress.
- `sweeps`: `sweep`, `attention_sweep` and `eval_sweep` as pool jobs; `field_variants`.
- `plan`: a whole study as one JSON plan (variants, seeds, ablations, an eval sweep), run as
  one batch (`load_plan`, `run_plan`); `report`: its tables (mean ± std, Welch p per
  ablation, `plan_markdown`); `figures`: its figures (`export_plan_figures`).
- `seeds`: seed batches and both significance bars of the challenge.
- `speed`: speed ablations: `SPEED_LEVERS` / `speed_variants` (the speed switches as sweep
  variants), `speed_table` (step ms, speedup over a baseline variant, MFU) and
  `loss_differences` (the same-math check against the baseline at the same seed).
- `results`: run folders into pandas tables (`load_runs`, `run_table`, `eval_table`, ...).
- `notebooks`: Papermill (`run_notebook`, `run_batch` over seeds on the pool).
- `folders`: study.json, FAILED.json and backups of replaced runs.
- `smoke`: the smoke study; `cli`: `lmcore study ...`.

Bad input (a parameter, a notebook, a run folder, an override, a reference) raises
`lmcore.errors.InputError` / `InputNotFound`, which the command line prints as one line.
"""

from __future__ import annotations

from lmcore.study.cli import register_cli
from lmcore.study.notebooks import notebook_parameters, parse_param, run_batch, run_notebook
from lmcore.study.paths import environment, repo_root, resolve
from lmcore.study.plan import Plan, load_plan, run_plan
from lmcore.study.report import ablation_table, plan_frame, plan_markdown, plan_tables
from lmcore.study.results import (
    aggregate,
    comparison_table,
    eval_table,
    expand_runs,
    find_runs,
    load_run,
    load_runs,
    run_table,
)
from lmcore.study.run import eval_phase, make_config, pack_phase, prepare_data, run_one, train_phase
from lmcore.study.schedule import Job, JobResult, default_devices, run_pool
from lmcore.study.seeds import (
    reference_runs,
    seed_runs,
    seeds_bars,
    seeds_summary,
    seeds_table,
    seeds_test,
    welch_table,
)
from lmcore.study.smoke import SMOKE_STUDY_OVERRIDES, smoke_study
from lmcore.study.speed import SPEED_LEVERS, loss_difference, loss_differences, speed_table, speed_variants
from lmcore.study.sweeps import attention_sweep, eval_sweep, field_variants, sweep

__all__ = [
    "SMOKE_STUDY_OVERRIDES",
    "SPEED_LEVERS",
    "Job",
    "JobResult",
    "Plan",
    "ablation_table",
    "aggregate",
    "attention_sweep",
    "comparison_table",
    "default_devices",
    "environment",
    "eval_phase",
    "eval_sweep",
    "eval_table",
    "expand_runs",
    "field_variants",
    "find_runs",
    "load_plan",
    "load_run",
    "load_runs",
    "loss_difference",
    "loss_differences",
    "make_config",
    "notebook_parameters",
    "pack_phase",
    "parse_param",
    "plan_frame",
    "plan_markdown",
    "plan_tables",
    "prepare_data",
    "reference_runs",
    "register_cli",
    "repo_root",
    "resolve",
    "run_batch",
    "run_notebook",
    "run_one",
    "run_plan",
    "run_pool",
    "run_table",
    "seed_runs",
    "seeds_bars",
    "seeds_summary",
    "seeds_table",
    "seeds_test",
    "smoke_study",
    "speed_table",
    "speed_variants",
    "sweep",
    "train_phase",
    "welch_table",
]
