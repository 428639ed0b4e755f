"""`lmcore submission`: the challenge hand-in as one folder, and the command line for it.

`export_submission(runs, out)` writes DIR/train_gpt.py (`lmcore.export.export_script`:
one self-contained script, lmcore's modules embedded, the config baked in; code bytes =
its size), DIR/train_seed{S}.log per run (`lmcore.runlog.format_log`), DIR/README.md and
DIR/submission.json. The logs show every evaluation phase (load, compile, plain pass if
run, TTT scoring and training), the wall time from the artifact load to the final score
(`eval_time`) and the scoring pass alone (`eval_scoring_time`). `lmcore submission check
DIR` runs `lmcore.compliance.check_submission`. Run folders that cannot be read as runs
of one config raise an `lmcore.errors.UserError` naming them.

The names that used to live here (export_script, code_bytes_of_export, needed_modules,
format_log, parse_log, check_submission, ...) are importable from here as before.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lmcore.compliance import REQUIRED_FILES, TIME_LIMIT_S, check_submission
from lmcore.config import Config
from lmcore.errors import InputError, InputNotFound
from lmcore.export import SCRIPT_NAME, code_bytes_of_export, export_script, minify_source, needed_modules
from lmcore.runlog import format_log, parse_log

__all__ = [
    "REQUIRED_FILES",
    "SCRIPT_NAME",
    "TIME_LIMIT_S",
    "check_submission",
    "code_bytes_of_export",
    "export_script",
    "export_submission",
    "format_log",
    "load_runs",
    "minify_source",
    "needed_modules",
    "parse_log",
    "register_cli",
]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputNotFound(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _mean_std(values: list[float]) -> tuple[float, float]:
    from lmcore.stats import mean_std

    return mean_std(values)


def _eval_seconds(ev: dict[str, Any]) -> tuple[float, float]:
    """(wall time from the artifact load to the final score, the scoring pass alone) of an eval.json."""
    ts = ev.get("time_s", {})
    scoring = ts.get("ttt") if "ttt" in ev else ts.get("sliding")
    return float(ts.get("total") or 0.0), float(scoring or 0.0)


def load_runs(run_dirs: list[str | Path]) -> tuple[Config, list[dict[str, Any]]]:
    """(the shared config with the first run's seed, per-run records); the configs must agree but for train.seed."""
    from lmcore.runs import read_jsonl

    if not run_dirs:
        raise InputError("give at least one run folder")
    runs, base = [], None
    for rd in map(Path, run_dirs):
        if not rd.is_dir():
            raise InputNotFound(f"run folder not found: {rd}")
        cfg = Config.load(rd / "config.json")
        d = cfg.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
        if base is None:
            base = (d, cfg, rd)
        elif d != base[0]:
            diff = [
                f"{s}.{k}" for s in d if isinstance(d[s], dict) for k in d[s] if d[s].get(k) != base[0][s].get(k)
            ] or ["name"]
            raise InputError(f"{rd}: config differs from {base[2]} beyond train.seed ({', '.join(diff)})")
        summary = _read_json(rd / "summary.json")
        if not summary.get("completed", False):
            raise InputError(f"{rd}: training did not complete (summary.json completed=false)")
        runs.append(
            {
                "dir": rd,
                "seed": cfg.train.seed,
                "summary": summary,
                "pack": _read_json(rd / "pack.json"),
                "eval": _read_json(rd / "eval.json"),
                "metrics": read_jsonl(rd / "metrics.jsonl"),
                "artifact": rd / "model.int6.ptz",
            }
        )
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"runs share a seed: {seeds}")
    return base[1], runs


def export_submission(
    run_dirs: list[str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    author: str | None = None,
    hardware: str | None = None,
    copy_artifacts: bool = False,
) -> dict[str, Any]:
    """Write the submission folder `out` from `run_dirs`; returns submission.json's content."""
    import shutil
    from datetime import date

    from lmcore.runs import atomic_write_bytes, atomic_write_json, atomic_write_text

    cfg, runs = load_runs(run_dirs)
    out = Path(out)
    script = export_script(cfg).encode("utf-8")
    code = len(script)
    atomic_write_bytes(out / SCRIPT_NAME, script)
    seed_results: dict[str, Any] = {}
    for r in runs:
        s, pk, ev, sm = r["seed"], r["pack"], r["eval"], r["summary"]
        wall, scoring = _eval_seconds(ev)
        atomic_write_text(out / f"train_seed{s}.log", format_log(sm, r["metrics"], pk, ev, code))
        seed_results[str(s)] = {
            "val_loss": ev["loss"],
            "val_bpb": ev["bpb"],
            "pre_quant_val_bpb": sm["val_bpb"],
            "artifact_bytes": pk["model_bytes"] + code,
            "model_bytes": pk["model_bytes"],
            "artifact_sha256": pk.get("sha256"),
            "steps": sm["steps"],
            "step_avg_ms": sm["mean_step_ms"],
            "train_seconds": sm["train_time_s"],
            "eval_seconds": round(wall, 3),
            "eval_scoring_seconds": round(scoring, 3),
            "ttt_score_first": "ttt" in ev,
        }
        if copy_artifacts and r["artifact"].is_file():
            shutil.copyfile(r["artifact"], out / f"model_seed{s}.int6.ptz")
    losses = [v["val_loss"] for v in seed_results.values()]
    bpbs = [v["val_bpb"] for v in seed_results.values()]
    ml, sl = _mean_std(losses)
    mb, sb = _mean_std(bpbs)
    model_bytes = max(v["model_bytes"] for v in seed_results.values())
    s0 = runs[0]["summary"]
    ttt_used = all("ttt" in r["eval"] for r in runs)
    card = s0.get("card", "?")
    sub = {
        "author": author or "unknown",
        "name": name or f"lmcore {cfg.name}",
        "blurb": f"lmcore config {cfg.name!r}, exported as a single train_gpt.py ({code} bytes).",
        "date": date.today().isoformat(),
        "track": "10min_16mb",
        "val_loss": ml,
        "val_bpb": mb,
        "val_loss_std": sl if math.isfinite(sl) else 0.0,
        "val_bpb_std": sb if math.isfinite(sb) else 0.0,
        "seeds": [r["seed"] for r in runs],
        "seed_results": seed_results,
        "artifact_bytes_max": max(v["artifact_bytes"] for v in seed_results.values()),
        "bytes_total": model_bytes + code,
        "code_bytes": code,
        "code_bytes_definition": "bytes of train_gpt.py (the single submission script)",
        "model_bytes": model_bytes,
        "train_steps_mean": sum(v["steps"] for v in seed_results.values()) / len(runs),
        "step_avg_ms_mean": sum(v["step_avg_ms"] for v in seed_results.values()) / len(runs),
        "train_seconds_max": max(v["train_seconds"] for v in seed_results.values()),
        "eval_seconds_max": max(v["eval_seconds"] for v in seed_results.values()),
        "eval_seconds_definition": "wall time from the artifact load to the final score (eval_scoring_seconds: "
        "the scoring pass alone, as accepted records time it)",
        "hardware": hardware or f"{s0.get('world_size', 1)}x{card}",
        "card": card,
        "world_size": s0.get("world_size", 1),
        "ttt": {
            "declared": ttt_used,
            "score_first": ttt_used,
            "method": "LatentMask TTT (lmcore.evaluate): each chunk is scored before it is trained on"
            if ttt_used
            else "none",
        },
        "config": cfg.to_dict(),
    }
    atomic_write_json(out / "submission.json", sub)
    atomic_write_text(out / "README.md", _readme(sub, code))
    return sub


def _readme(sub: dict[str, Any], code: int) -> str:
    rows = "\n".join(
        f"| {s} | {v['val_loss']:.6f} | {v['val_bpb']:.6f} | {v['steps']} | {v['step_avg_ms']:.2f} | "
        f"{v['train_seconds']:.1f} | {v['eval_seconds']:.1f} | {v['eval_scoring_seconds']:.1f} | "
        f"{v['model_bytes']:,} | {v['artifact_bytes']:,} |"
        for s, v in sub["seed_results"].items()
    )
    return f"""# {sub["name"]}

Author: {sub["author"]}. Track: {sub["track"]}. Hardware: {sub["hardware"]}.

**val_bpb {sub["val_bpb"]:.6f}** (std {sub["val_bpb_std"]:.6f}), val_loss {sub["val_loss"]:.6f}
(std {sub["val_loss_std"]:.6f}) over seeds {", ".join(map(str, sub["seeds"]))}.

| seed | val_loss | val_bpb | steps | step ms | train s | eval s (wall) | eval s (scoring) | model bytes | total bytes |
|---|---|---|---|---|---|---|---|---|---|
{rows}

Eval s (wall) runs from the artifact load to the final score (loading, compilation and any
diagnostic pass included); eval s (scoring) is the scoring pass alone (TTT: scoring and
mask training), as accepted records time it. Each log lists every phase.

**Code bytes: {code:,}** = the size in bytes of `train_gpt.py`, the single self-contained script
(lmcore's source embedded, config baked in). Total bytes per seed = code bytes + the size of
that seed's compressed model (`model.int6.ptz`); limit 16,000,000.

Test-time training: {sub["ttt"]["method"]}.

Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (or `python train_gpt.py` for
one process); `--set train.seed=S` picks the seed, `--run-dir DIR` the output folder.
Each run writes `train_seed{{S}}.log`; the logs here are those of the runs above.
"""



# ---------------------------------------------------------------------------- CLI


def _cmd_export(args: argparse.Namespace) -> int:
    sub = export_submission(
        args.runs,
        args.out,
        name=args.name,
        author=args.author,
        hardware=args.hardware,
        copy_artifacts=args.copy_artifacts,
    )
    print(
        f"wrote {args.out}: train_gpt.py ({sub['code_bytes']:,} code bytes), {len(sub['seeds'])} logs, "
        f"README.md, submission.json; val_bpb {sub['val_bpb']:.6f} (std {sub['val_bpb_std']:.6f}), "
        f"max total bytes {sub['bytes_total']:,}"
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    fails, notes = check_submission(
        args.dir,
        reference_bpb=args.reference_bpb,
        reference_loss=args.reference_loss,
        reference_losses=args.reference_losses,
    )
    for f in fails:
        print(f"FAIL {f}")
    if not fails:
        print("PASS")
    for n in notes:
        print(f"NOTE {n}")
    return 1 if fails else 0


def register_cli(sub: Any) -> None:
    """Add `lmcore submission export` and `lmcore submission check`."""
    p = sub.add_parser(
        "submission",
        help="export runs as a challenge submission folder; check a submission folder",
        description="export: one self-contained train_gpt.py (code bytes = its size), per-seed logs, "
        "README.md and submission.json. check: size, time (evaluation: the wall time from the artifact load "
        "to the final score), TTT and consistency rules, and with a reference both significance bars.",
    )
    s = p.add_subparsers(dest="submission_command", metavar="ACTION")
    s.required = True
    e = s.add_parser("export", help="write DIR/train_gpt.py, train_seed{S}.log, README.md, submission.json")
    e.add_argument("--runs", nargs="+", required=True, help="run folders (same config, different train.seed)")
    e.add_argument("--out", required=True, help="submission folder to write")
    e.add_argument("--name", default=None)
    e.add_argument("--author", default=None)
    e.add_argument("--hardware", default=None, help="e.g. '8xH100 80GB SXM' (default: from the runs)")
    e.add_argument("--copy-artifacts", action="store_true", help="also copy model.int6.ptz as model_seed{S}.int6.ptz")
    e.set_defaults(func=_cmd_export)
    c = s.add_parser("check", help="check a submission folder; exit 1 naming each failed rule (NOTE lines inform)")
    c.add_argument("dir")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--reference-bpb", type=float, default=None, help="the record to beat, in val_bpb")
    g.add_argument("--reference-loss", type=float, default=None, help="the record to beat, in val_loss (nats)")
    g.add_argument(
        "--reference-losses",
        type=float,
        nargs="+",
        default=None,
        metavar="LOSS",
        help="the record to beat as per-seed val_loss values (its seeds pooled with reproductions)",
    )
    c.set_defaults(func=_cmd_check)
