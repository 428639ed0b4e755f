"""`lmcore submission check`: does a submission folder follow the challenge's rules?

`check_submission(dir)` returns (failed checks, notes), one line each, naming the file and
what is wrong: required files; code bytes = the size of train_gpt.py; per seed, total
bytes (code + model, from submission.json, the log and any copied artifact) <= 16,000,000,
training <= 600 s, evaluation judged on the wall time from the artifact load to the final
score (the strictest reading of the 600 s; the scoring-pass time that accepted records
report is a note), TTT declared and score-first, submission.json agreeing with the logs
(`lmcore.runlog.parse_log`); the seeds' means and stds. With a reference, the README's
significance bar is a rule and the maintainers' practice bar a note
(`lmcore.stats.challenge_bars`). A folder or submission.json that cannot be read as one
raises an `lmcore.errors.UserError` naming it (the CLI: one line, exit 2).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lmcore.errors import InputError, InputNotFound
from lmcore.export import SCRIPT_NAME
from lmcore.pack import SIZE_LIMIT
from lmcore.runlog import parse_log

TIME_LIMIT_S = 600.0
REQUIRED_FILES = (SCRIPT_NAME, "README.md", "submission.json")

_JSON_TYPE = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
_INT_FIELDS = ("code_bytes", "bytes_total", "model_bytes", "artifact_bytes_max")
_NUM_FIELDS = ("val_bpb", "val_loss", "val_bpb_std", "val_loss_std")
_SEED_INT_FIELDS = ("model_bytes", "artifact_bytes", "steps")
_SEED_NUM_FIELDS = ("val_loss", "val_bpb", "train_seconds", "eval_seconds", "eval_scoring_seconds")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_submission(path: Path) -> dict[str, Any]:
    """submission.json as a dict whose byte counts are integers and scores numbers (absent
    or null fields are left to the rules); anything else raises InputError naming the
    file and the field."""

    def bad(field: str, value: Any, want: str) -> InputError:
        got = _JSON_TYPE.get(type(value), f"{json.dumps(value)[:40]}")
        return InputError(f"{path}: field {field} must be {want}, got {got}")

    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(sub, dict):
        raise InputError(f"{path}: expected a JSON object, got {_JSON_TYPE.get(type(sub), 'a number')}")
    checks = [(k, sub.get(k), _is_int, "an integer") for k in _INT_FIELDS]
    checks += [(k, sub.get(k), _is_num, "a number") for k in _NUM_FIELDS]
    per = sub.get("seed_results")
    if per is not None and not isinstance(per, dict):
        raise bad("seed_results", per, "an object (seed -> results)")
    for seed, res in (per or {}).items():
        if not isinstance(res, dict):
            raise bad(f"seed_results.{seed}", res, "an object")
        checks += [(f"seed_results.{seed}.{k}", res.get(k), _is_int, "an integer") for k in _SEED_INT_FIELDS]
        checks += [(f"seed_results.{seed}.{k}", res.get(k), _is_num, "a number") for k in _SEED_NUM_FIELDS]
    if sub.get("ttt") is not None and not isinstance(sub["ttt"], dict):
        raise bad("ttt", sub["ttt"], "an object")
    for field, value, ok, want in checks:
        if value is not None and not ok(value):
            raise bad(field, value, want)
    return sub


def check_submission(
    folder: str | Path,
    *,
    reference_bpb: float | None = None,
    reference_loss: float | None = None,
    tol: float = 1e-6,
    reference_losses: list[float] | None = None,
) -> tuple[list[str], list[str]]:
    """(failures, notes): each failure is one line naming the file and what is wrong.

    A folder that is not there (or is a file) or a submission.json that cannot be read as
    one raises InputError / InputNotFound naming it (the CLI: one line, exit 2).
    Evaluation time is judged by the strictest reading: the wall time from the artifact
    load to the final score must be <= 600 s; the scoring pass alone (what accepted
    records time) is reported as a note. With a reference (one val_bpb, one val_loss, or
    per-seed val_losses pooled), the README's significance bar is a rule and the
    maintainers' practice bar a note (`lmcore.stats.challenge_bars`).
    """
    d = Path(folder)
    if not d.exists():
        raise InputNotFound(f"{d}: submission folder not found")
    if not d.is_dir():
        raise InputError(f"{d}: is a file; a submission folder is expected (holding {', '.join(REQUIRED_FILES)})")
    fails: list[str] = []
    notes: list[str] = []
    for f in REQUIRED_FILES:
        if not (d / f).is_file():
            fails.append(f"{f}: required file missing")
    logs = sorted(d.glob("train_seed*.log"))
    if not logs:
        fails.append("train_seed*.log: no training logs")
    if not (d / "submission.json").is_file():
        return fails, notes
    sub = _read_submission(d / "submission.json")
    code = (d / SCRIPT_NAME).stat().st_size if (d / SCRIPT_NAME).is_file() else None
    if code is not None and sub.get("code_bytes") != code:
        fails.append(f"submission.json: code_bytes {sub.get('code_bytes')} != size of train_gpt.py {code}")
    code = code if code is not None else int(sub.get("code_bytes") or 0)
    per = sub.get("seed_results") or {}
    if not per:
        fails.append("submission.json: no seed_results")
    log_seeds = {re.fullmatch(r"train_seed(.+)\.log", p.name).group(1): p for p in logs}
    if set(map(str, per)) != set(log_seeds) and per and logs:
        fails.append(f"submission.json: seeds {sorted(per)} != seeds of the logs {sorted(log_seeds)}")
    ttt_decl = sub.get("ttt") or {}
    if not ttt_decl or "declared" not in ttt_decl:
        fails.append("submission.json: test-time training not declared (field ttt)")
    walls: list[float] = []
    scorings: list[float] = []
    for seed, res in per.items():
        lg = parse_log(log_seeds[seed].read_text(encoding="utf-8", errors="replace")) if seed in log_seeds else {}
        fails += _check_sizes(d, lg, seed=seed, res=res, code=code)
        if seed not in log_seeds:
            continue
        fails += _check_log(lg, seed=seed, res=res, lname=log_seeds[seed].name, ttt_decl=ttt_decl, tol=tol)
        if "eval_time" in lg:
            walls.append(lg["eval_time"])
        if "eval_scoring_time" in lg:
            scorings.append(lg["eval_scoring_time"])
    if per:
        f_tot, n_tot = _check_totals(sub, per, code, tol)
        fails += f_tot
        notes += n_tot
    if walls:
        scoring = f"; scoring pass alone max {max(scorings):.1f}s" if scorings else ""
        notes.append(
            f"evaluation time: wall max {max(walls):.1f}s (artifact load to final score; the {TIME_LIMIT_S:.0f} s "
            f"limit is applied to it, the README's strict reading){scoring} (what accepted records time: "
            "the scoring pass only, openai/parameter-golf #1855)"
        )
    if (reference_bpb is not None or reference_loss is not None or reference_losses) and per:
        f_ref, n_ref = _significance(per, reference_bpb, reference_loss, reference_losses)
        fails += f_ref
        notes += n_ref
    return fails, notes


def _check_sizes(d: Path, lg: dict[str, Any], *, seed: str, res: dict[str, Any], code: int) -> list[str]:
    """One seed's total bytes by submission.json, any copied artifact and its log (`lg`, parsed);
    its artifact_bytes."""
    fails = []
    model = res.get("model_bytes") or 0
    sizes = {"submission.json model_bytes": model}
    art = d / f"model_seed{seed}.int6.ptz"
    if art.is_file():
        sizes["artifact file"] = art.stat().st_size
    if "model_bytes" in lg:
        sizes["log model_bytes"] = lg["model_bytes"]
    for what, m in sizes.items():
        if m + code > SIZE_LIMIT:
            fails.append(
                f"seed {seed}: total bytes {m + code:,} (code {code:,} + model {m:,}, {what}) > {SIZE_LIMIT:,}"
            )
    if res.get("artifact_bytes") is not None and res["artifact_bytes"] > SIZE_LIMIT:
        fails.append(f"seed {seed}: submission.json artifact_bytes {res['artifact_bytes']:,} > {SIZE_LIMIT:,}")
    if res.get("artifact_bytes") != model + code:
        fails.append(
            f"seed {seed}: submission.json artifact_bytes {res.get('artifact_bytes')} != model {model} + code {code}"
        )
    return fails


def _check_log(
    lg: dict[str, Any], *, seed: str, res: dict[str, Any], lname: str, ttt_decl: dict[str, Any], tol: float
) -> list[str]:
    """One seed's log (parsed): its lines present, time limits, TTT score-first, agreement with submission.json."""
    tag = f"seed {seed}"
    needed = ("train_time", "eval_time", "val_bpb", "val_loss", "ttt", "model_bytes")
    fails = [f"{lname}: no {key} line" for key in needed if key not in lg]
    if lg.get("train_time", 0.0) > TIME_LIMIT_S:
        fails.append(f"{tag}: training took {lg['train_time']:.1f}s > {TIME_LIMIT_S:.0f}s ({lname})")
    if lg.get("eval_time", 0.0) > TIME_LIMIT_S:
        alone = f"; the scoring pass alone took {lg['eval_scoring_time']:.1f}s" if "eval_scoring_time" in lg else ""
        fails.append(
            f"{tag}: evaluation took {lg['eval_time']:.1f}s > {TIME_LIMIT_S:.0f}s (wall time from the artifact "
            f"load to the final score, the strictest reading{alone}) ({lname})"
        )
    ttt_line = lg.get("ttt", "")
    if ttt_line and ttt_line != "none":
        if not ttt_line.startswith("score-first"):
            fails.append(f"{tag}: TTT in {lname} is not score-first ({ttt_line!r})")
        if not (ttt_decl.get("declared") and ttt_decl.get("score_first")):
            fails.append(f"{tag}: the log shows TTT but submission.json does not declare it score-first")
    for key in ("val_bpb", "val_loss"):
        if key in lg and (res.get(key) is None or abs(lg[key] - res[key]) > tol):
            fails.append(f"{tag}: submission.json {key} {res.get(key)} disagrees with {lname} ({lg[key]:.8f})")
    model = res.get("model_bytes") or 0
    if "model_bytes" in lg and lg["model_bytes"] != model:
        fails.append(f"{tag}: submission.json model_bytes {model} disagrees with {lname} ({lg['model_bytes']})")
    for key, lkey in (
        ("train_seconds", "train_time"),
        ("eval_seconds", "eval_time"),
        ("eval_scoring_seconds", "eval_scoring_time"),
    ):
        if lkey in lg and res.get(key) is not None and abs(lg[lkey] - res[key]) > 0.01:
            fails.append(f"{tag}: submission.json {key} {res[key]} disagrees with {lname} ({lg[lkey]:.3f}s)")
    return fails


def _check_totals(sub: dict[str, Any], per: dict[str, Any], code: int, tol: float) -> tuple[list[str], list[str]]:
    """(failures, notes) of the summary fields: the seeds' mean and std, bytes_total."""
    from lmcore.stats import mean_std

    fails = []
    for key in ("val_bpb", "val_loss"):
        vals = [float(r[key]) if r.get(key) is not None else math.nan for r in per.values()]
        m, s = mean_std(vals)
        if sub.get(key) is None or not abs(m - sub[key]) <= tol:
            fails.append(f"submission.json: {key} {sub.get(key)} != mean of the seeds {m:.8f}")
        if len(vals) > 1 and (sub.get(f"{key}_std") is None or not abs(s - sub[f"{key}_std"]) <= tol):
            fails.append(f"submission.json: {key}_std {sub.get(f'{key}_std')} != std of the seeds {s:.8f}")
    mb = max(r.get("model_bytes") or 0 for r in per.values())
    if sub.get("bytes_total") != mb + code:
        fails.append(f"submission.json: bytes_total {sub.get('bytes_total')} != max model {mb} + code {code}")
    note = (
        f"{len(per)} seeds, val_bpb {float(sub.get('val_bpb') or math.nan):.6f}, max total bytes "
        f"{mb + code:,} <= {SIZE_LIMIT:,} (code {code:,} = size of train_gpt.py)"
    )
    return fails, [note]


def _significance(
    per: dict[str, Any],
    reference_bpb: float | None,
    reference_loss: float | None,
    reference_losses: list[float] | None,
) -> tuple[list[str], list[str]]:
    """(failures, notes) of both significance bars: the README's is a rule, the practice bar a note."""
    from lmcore.stats import challenge_bars

    need = ("val_loss", "val_bpb") if reference_bpb is not None else ("val_loss",)
    missing = [s for s, r in per.items() if any(not r.get(k) for k in need)]
    if missing:
        return [f"submission.json: seeds {missing} lack val_loss or val_bpb; cannot test significance"], []
    losses = [float(r["val_loss"]) for r in per.values()]
    reference: float | list[float]
    if reference_losses:
        reference = [float(x) for x in reference_losses]
        ref_txt = f"reference val_loss of {len(reference)} seeds, pooled"
    elif reference_loss is None:
        # bpb -> nats per token with this submission's own tokens-per-byte ratio (same val split)
        ratios = [float(r["val_loss"]) / float(r["val_bpb"]) for r in per.values()]
        reference = float(reference_bpb) * sum(ratios) / len(ratios)
        ref_txt = f"reference val_bpb {reference_bpb} = {reference:.6f} nats/token"
    else:
        reference = float(reference_loss)
        ref_txt = f"reference val_loss {reference:.6f} nats/token"
    bars = challenge_bars(losses, reference)
    readme, practice = bars["readme"], bars["practice"]
    head = f"significance ({ref_txt})"

    def verdict(r: Any) -> str:
        return "passed" if r.passed else "NOT passed"

    notes = [f"{head}: {practice.statement}"]
    notes.append(f"significance: README bar {verdict(readme)}; maintainers' frontier bar {verdict(practice)}")
    if readme.passed:
        return [], [f"{head}: {readme.statement}", *notes]
    return [f"{head}: {readme.statement}"], notes
