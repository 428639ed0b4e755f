"""The `lmcore study` command: notebook batches over seeds (`run`), one notebook (`execute`,
what a batch's jobs run), one run end to end (`run-one`, what a sweep's jobs run), the smoke
study, seed tables with the challenge's two bars, and the figures."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd

from lmcore.errors import InputNotFound
from lmcore.study.notebooks import parse_param, run_batch, run_notebook
from lmcore.study.paths import resolve
from lmcore.study.plan import PLAN_IF_EXISTS, run_plan
from lmcore.study.run import IF_EXISTS, run_one
from lmcore.study.seeds import seeds_bars, seeds_summary, seeds_table, welch_table
from lmcore.study.smoke import smoke_study

__all__ = ["register_cli"]


def _devices(text: str | None) -> list[str] | None:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def _cmd_run(args: argparse.Namespace) -> int:
    params = {k: parse_param(v) for k, v in (args.param or [])}
    summary = run_batch(args.notebook, parameters=params, seeds=args.seeds, runs_dir=args.runs_dir,
                        out_dir=args.out_dir, name=args.name, kernel_name=args.kernel, num_gpus=args.num_gpus,
                        devices=_devices(args.devices), log=None if args.quiet else print)
    for e in summary["runs"]:
        print(f"{e['status']:>6}  {e['name']}  {e['notebook']}" + (f"  ({e['error']})" if e.get("error") else ""))
    return 1 if summary["failed"] else 0


def _cmd_execute(args: argparse.Namespace) -> int:
    params = parse_param(args.params) if args.params else {}
    try:
        run_notebook(args.notebook, args.output, params, cwd=args.cwd, kernel_name=args.kernel)
    except Exception as e:  # noqa: BLE001 - papermill's PapermillExecutionError, a dead kernel, ...
        print(f"lmcore study execute: notebook failed: {getattr(e, 'ename', type(e).__name__)}: "
              f"{getattr(e, 'evalue', e)} (executed notebook: {args.output})", file=sys.stderr)
        return 1
    return 0


def _cmd_run_one(args: argparse.Namespace) -> int:
    row = run_one(args.run_dir, preset=args.preset, overrides=args.overrides, seed=args.seed,
                  pack_overrides=args.pack_overrides, eval_overrides=args.eval_overrides, ttt=args.ttt,
                  num_gpus=args.num_gpus, study=args.study, variant=args.variant, pack=not args.no_pack,
                  evaluate=not args.no_eval, if_exists=args.if_exists, progress=not args.no_progress, log=print)
    print(f"{row['path']}: {row['status']}, val_bpb {row['val_bpb']} ({row['score_source']})")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    df = run_plan(args.plan, runs_dir=args.runs_dir, devices=_devices(args.devices), num_gpus=args.num_gpus,
                  if_exists=args.if_exists, progress=not args.no_progress, log=print)
    for _, row in df.iterrows():
        print(f"{row['status']:>11}  {row['run']}  val_bpb {row['val_bpb']} ({row['score_source']})")
    return 1 if (df["status"] == "failed").any() else 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    s = smoke_study(runs_dir=args.runs_dir, figures_dir=args.figures_dir, stream=not args.quiet)
    print(f"smoke study done in {s['time_s']['total']:.0f}s: " + ", ".join(
        f"{k} {v:.0f}s" for k, v in s["time_s"].items() if k != "total"))
    print("executed notebooks:\n  " + "\n  ".join(s["notebooks"]))
    print(f"figures ({len(s['figures'])} files):\n  " + "\n  ".join(s["figures"]))
    print(s["figures_dir"])
    return 0


def _one_or_list(v: list[float] | None) -> float | list[float] | None:
    if v is None:
        return None
    return v[0] if len(v) == 1 else v


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


def _cmd_figures(args: argparse.Namespace) -> int:
    from lmcore import plots
    from lmcore.study.figures import export_plan_figures
    from lmcore.study.report import find_plans

    runs = resolve(args.runs_dir)
    if not runs.is_dir():
        raise InputNotFound(f"runs folder not found: {runs} (--runs-dir)")
    plans = find_plans(runs)
    if plans:  # the studies' figures, from their plans
        results = [export_plan_figures(p, runs, resolve(args.out)) for p in plans]
    else:
        results = [plots.export_figures(runs, resolve(args.out))]
    made = [p for res in results for v in res.values() if not isinstance(v, str) for p in v]
    print(resolve(args.out) if made else "no figure written")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lmcore.runs import atomic_write_text
    from lmcore.study.report import find_plans, plan_markdown

    runs = resolve(args.runs_dir)
    plans = [resolve(args.plan)] if args.plan else find_plans(runs)
    if not plans:
        raise InputNotFound(f"no plan.json under {runs} (--runs-dir); give --plan")
    text = "\n".join(plan_markdown(p, runs) for p in plans)
    if args.out:
        atomic_write_text(resolve(args.out), text)
        print(resolve(args.out))
    else:
        print(text)
    return 0


def _add_run(ss: Any) -> None:
    r = ss.add_parser(
        "run",
        help="execute a notebook with Papermill, once per seed, spread over the GPUs; a failed run is recorded "
             "and the batch goes on",
        description="Each run's executed notebook lands in its run folder (RUNS_DIR/NAME-sSEED/notebook.ipynb), "
        "the cells' output in notebook.log beside it; a failure writes FAILED.json there; the batch summary goes "
        "to RUNS_DIR/batches/. The runs share the node's GPUs, --num-gpus each (CUDA_VISIBLE_DEVICES). "
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
    r.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs per run (default: the num_gpus parameter, else 1); injected as num_gpus")
    r.add_argument("--devices", default=None, metavar="0,1,...",
                   help="the GPUs to share (default: every visible GPU; one slot on a CPU)")
    r.add_argument("--quiet", action="store_true", help="no progress lines, only the result of each run")
    r.set_defaults(func=_cmd_run)

    e = ss.add_parser("execute", help="execute one notebook with Papermill (what each job of `study run` runs)")
    e.add_argument("notebook")
    e.add_argument("output", help="the executed notebook")
    e.add_argument("--params", default=None, help="the parameters as a JSON object")
    e.add_argument("--cwd", default=None, help="the kernel's working directory (default: the notebook's folder)")
    e.add_argument("--kernel", default=None)
    e.set_defaults(func=_cmd_execute)


def _add_run_one(ss: Any) -> None:
    o = ss.add_parser(
        "run-one",
        help="one run end to end (data, train, pack, eval) with the study's bookkeeping (what a sweep's jobs run)",
        description="Trains PRESET + --set overrides into --run-dir, packs it (--pack-set: quant.* fields only), "
        "evaluates it (--eval-set: eval.* fields only); each phase timed into study.json; a failure writes "
        "FAILED.json. With --num-gpus > 1 training and evaluation run under torchrun.",
    )
    o.add_argument("--run-dir", required=True)
    o.add_argument("--preset", default="smoke")
    o.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a config override for the run (repeatable)")
    o.add_argument("--pack-set", dest="pack_overrides", action="append", default=[], metavar="quant.FIELD=VALUE")
    o.add_argument("--eval-set", dest="eval_overrides", action="append", default=[], metavar="eval.FIELD=VALUE")
    o.add_argument("--seed", type=int, default=None)
    o.add_argument("--ttt", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate with / without TTT (default: the config's eval.ttt)")
    o.add_argument("--num-gpus", type=int, default=1)
    o.add_argument("--study", default=None)
    o.add_argument("--variant", default=None)
    o.add_argument("--no-pack", action="store_true")
    o.add_argument("--no-eval", action="store_true")
    o.add_argument("--if-exists", choices=IF_EXISTS, default="replace",
                   help="replace (move a finished run to a backup), reuse (keep phases whose config is the same) "
                        "or error")
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=_cmd_run_one)


def _add_plan(ss: Any) -> None:
    o = ss.add_parser(
        "plan",
        help="every run of a study plan (JSON: variants, seeds, ablations, an eval sweep) in one batch on the GPUs",
        description="Trains, packs and evaluates every variant and seed of PLAN into RUNS_DIR/<study>/"
        "<variant>-s<seed>, seed-major, as jobs of one GPU pool, then runs the plan's eval sweep; the plan is "
        "copied to RUNS_DIR/<study>/plan.json for the tables and figures. Exit status 1 when any run failed.",
    )
    o.add_argument("plan", help="the plan file, e.g. studies/gpu.json")
    o.add_argument("--runs-dir", default="runs")
    o.add_argument("--devices", default=None, metavar="0,1,...", help="the GPUs to share (default: every visible GPU)")
    o.add_argument("--num-gpus", type=int, default=1, help="GPUs per run")
    o.add_argument("--if-exists", choices=PLAN_IF_EXISTS, default="replace",
                   help="replace, reuse (phases with the same config and their files), error, or keep: leave every "
                        "finished run as it is, weights or not (e.g. committed from an earlier session), and run "
                        "only the rest (add seeds to a plan and run it again)")
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=_cmd_plan)


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "study",
        help="notebook batches (Papermill), sweeps' runs, the smoke study, seed tables, figures",
        description="The notebook-driven study: run a notebook in batch over seeds, one run end to end, the CPU "
        "smoke study, seed tables with the challenge's Welch test, and the figures.",
    )
    ss = p.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    ss.required = True
    _add_run(ss)
    _add_run_one(ss)
    _add_plan(ss)

    s = ss.add_parser(
        "smoke",
        help="the CPU smoke study: data, train, pack, eval, bigram ablation, figures (offline, minutes)",
        description="Executes notebooks/01_train, 03_ablation_bigram and 06_figures with Papermill on the "
        "smoke preset (shortened); executed notebooks go into the run folders under --runs-dir and "
        "the figures into --figures-dir, whose path is printed last.",
    )
    s.add_argument("--runs-dir", default="runs/smoke")
    s.add_argument("--figures-dir", default="runs/smoke/figures")
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

    rp = ss.add_parser("report", help="the tables of a study plan's ablations (Markdown: mean ± std, Welch p)",
                       description="One table per ablation of each plan.json under --runs-dir (or --plan): each "
                       "variant's mean ± std over seeds, its difference from the baseline and one-sided Welch "
                       "p-values both ways; then the eval sweep.")
    rp.add_argument("--runs-dir", default="runs")
    rp.add_argument("--plan", default=None, help="one plan file (default: every RUNS_DIR/*/plan.json)")
    rp.add_argument("--out", default=None, help="write the Markdown here instead of printing it")
    rp.set_defaults(func=_cmd_report)

    f = ss.add_parser("figures", help="export every figure from the runs under --runs-dir (PNG + SVG): each "
                      "study plan's figures, or without a plan.json the generic ones")
    f.add_argument("--runs-dir", default="runs")
    f.add_argument("--out", default="figures")
    f.set_defaults(func=_cmd_figures)
