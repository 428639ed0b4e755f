"""`lmcore submission`: the challenge hand-in as one folder, and a compliance check for it.

`export_script(cfg)` generates ONE self-contained `train_gpt.py`: the source of the lmcore
modules needed to train, pack and evaluate (found from the import graph, `needed_modules`)
is embedded as string literals and served to `import lmcore.X` by a meta-path importer that
the script puts first on `sys.meta_path` (an installed lmcore is never used: names that
are not embedded raise ModuleNotFoundError). The config is baked in as JSON. Its main()
reads RANK / WORLD_SIZE / LOCAL_RANK (it is a command line), then trains, packs and
evaluates exactly like lmcore (`lmcore.train.train`, `lmcore.pack.pack_run`,
`lmcore.evaluate.eval_run`), passing its own size as the code bytes, and writes
`train_seed{S}.log` into its run folder. Its evaluation does only what the score needs
(the TTT pass); the plain sliding pass runs only with `--plain-pass`. Only the standard
library, torch, numpy, sentencepiece and brotli are imported.

Code bytes are the bytes of that script: `code_bytes_of_export(cfg)`, which `lmcore pack`
also uses for pack.json, so both count the same file.

`export_submission(runs, out)` writes DIR/train_gpt.py, DIR/train_seed{S}.log per run,
DIR/README.md and DIR/submission.json. The logs show every evaluation phase (load,
compile, plain pass if run, TTT scoring and training), the wall time from the artifact
load to the final score (`eval_time`) and the scoring pass alone (`eval_scoring_time`).
`check_submission(dir)` returns (failed checks, notes), one line each: evaluation is
judged on the wall time (the strictest reading of the 600 s), the scoring-pass time that
accepted records report is a note; with a reference, the README's significance bar is a
rule and the maintainers' practice bar a note (`lmcore.stats.challenge_bars`). A folder or
submission.json that cannot be read as one raises an `lmcore.errors.UserError`.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import math
import re
from pathlib import Path
from typing import Any

import brotli

from lmcore.config import Config, is_smoke_config
from lmcore.errors import InputError, InputNotFound
from lmcore.pack import SIZE_LIMIT

TIME_LIMIT_S = 600.0
SCRIPT_NAME = "train_gpt.py"
REQUIRED_FILES = ("train_gpt.py", "README.md", "submission.json")

# Modules the exported script runs: train, pack and evaluate, and what they import.
ROOT_MODULES = ("train", "pack", "evaluate")
# Imported only by command-line helpers (never on the train / pack / eval path).
CLI_ONLY = frozenset({"info", "cli", "__main__", "fineweb", "study", "plots", "submission"})
# Building shards from documents: reached from train only through the `lmcore data build` CLI
# registration, needed in the script only when it builds the smoke corpus itself.
DATA_BUILD_ONLY = frozenset({"corpus"})
# Third-party modules the script may import.
ALLOWED_THIRD_PARTY = frozenset({"torch", "numpy", "sentencepiece", "brotli"})

_PKG = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- import graph


def _lmcore_imports(source: str) -> tuple[set[str], set[str]]:
    """(lmcore modules, other top-level modules) imported anywhere in `source`."""
    mods: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lmcore."):
                    mods.add(a.name.split(".")[1])
                else:
                    other.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "lmcore":
                mods.update(a.name for a in node.names)
            elif node.module.startswith("lmcore."):
                mods.add(node.module.split(".")[1])
            else:
                other.add(node.module.split(".")[0])
    return mods, other



def needed_modules(cfg: Config, pkg: Path = _PKG) -> list[str]:
    """The lmcore modules the exported script must embed for `cfg` (sorted).

    The closure of train, pack and evaluate under imports, without modules that only
    serve the command line (info: train's CLI; never reached from `train()`); smoke_data
    only when the config trains on the smoke corpus (train() then builds it if missing).
    """
    smoke = is_smoke_config(cfg)
    todo = list(ROOT_MODULES) + (["smoke_data"] if smoke else [])
    skip = CLI_ONLY | ({"smoke_data"} if not smoke else set()) | (DATA_BUILD_ONLY if not smoke else set())
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen or m in skip:
            continue
        seen.add(m)
        mods, _ = _lmcore_imports((pkg / f"{m}.py").read_text(encoding="utf-8"))
        todo.extend(mods)
    return sorted(seen)


def third_party_imports(modules: list[str], pkg: Path = _PKG) -> set[str]:
    """Top-level non-lmcore modules imported anywhere by `modules` (lazy imports included)."""
    import sys

    out: set[str] = set()
    for m in modules:
        _, other = _lmcore_imports((pkg / f"{m}.py").read_text(encoding="utf-8"))
        out |= {o for o in other if o not in sys.stdlib_module_names and o != "__future__"}
    return out


# ---------------------------------------------------------------------------- the log format
# Shared verbatim by lmcore (export) and the exported script (its own log), so both logs
# read the same and `submission check` can parse either.

_LOG_SOURCE = r'''
def format_log(summary, metrics, pack, ev, code_bytes):
    """A readable training + evaluation log from a run's summary, metrics, pack and eval."""
    L = []
    seed = summary.get("seed")
    L.append(f"# train_gpt.py log: seed {seed}, config {summary.get('preset')}, card {summary.get('card')}, "
             f"world_size {summary.get('world_size')}")
    for r in metrics:
        k = r.get("kind")
        if k == "train":
            L.append(f"step:{r['step']} train_loss:{r['train_loss']:.4f} lr_mul:{r['lr_mul']:.3f} "
                     f"step_ms:{r['step_ms']:.2f} elapsed_ms:{r['elapsed_ms']:.1f}")
        elif k == "val":
            L.append(f"step:{r['step']} val({r.get('weights')}) val_loss:{r['val_loss']:.6f} "
                     f"val_bpb:{r['val_bpb']:.6f} elapsed_ms:{r['elapsed_ms']:.1f}")
        elif k == "event":
            L.append(f"step:{r['step']} event:{r.get('event')}")
    ts = ev.get("time_s", {})
    sec = lambda k: ts.get(k) or 0.0  # noqa: E731
    ttt = "ttt" in ev
    phases = [f"load {sec('load'):.3f}s", f"compile {sec('compile'):.3f}s"]
    if ttt and ts.get("sliding") is not None:
        phases.append(f"plain pass {sec('sliding'):.3f}s (diagnostic, not needed for the score)")
    if ttt:
        phases.append(f"ttt scoring {sec('ttt_score'):.3f}s, ttt training {sec('ttt_train'):.3f}s")
    else:
        phases.append(f"sliding scoring {sec('sliding'):.3f}s")
    cal = pack.get("calibration_time_s", (pack.get("timings_s") or {}).get("calibration"))
    L += [
        f"steps: {summary['steps']}",
        f"step_avg_ms: {summary['mean_step_ms']:.3f}",
        f"stopped_by: {summary.get('stopped_by')}",
        f"train_time: {summary['train_time_s']:.3f}s",
        f"pre-quant val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f}",
        f"model_bytes: {pack['model_bytes']}",
        f"code_bytes: {code_bytes}",
        f"total_bytes: {pack['model_bytes'] + code_bytes}",
        f"artifact_sha256: {pack.get('sha256')}",
        f"calibration_time: {cal or 0.0:.3f}s (samples the model itself, reads no training data: "
        "in neither the training nor the evaluation budget)",
        "ttt: " + ("score-first (LatentMask TTT: every chunk is scored before it is trained on)" if ttt else "none"),
        "eval_phases: " + ", ".join(phases),
        f"eval_time: {sec('total'):.3f}s (wall, from the artifact load to the final score)",
        f"eval_scoring_time: {sec('ttt') if ttt else sec('sliding'):.3f}s "
        f"(the {'TTT' if ttt else 'sliding'} scoring pass alone, as accepted records time it)",
        f"final val_loss:{ev['loss']:.8f} val_bpb:{ev['bpb']:.8f}",
    ]
    return "\n".join(L) + "\n"
'''

_ns: dict[str, Any] = {}
exec(compile(_LOG_SOURCE, "<lmcore.submission log format>", "exec"), _ns)  # noqa: S102
format_log = _ns["format_log"]

_LOG_PATTERNS = {
    "train_time": r"^train_time: ([0-9.eE+-]+)s",
    "eval_time": r"^eval_time: ([0-9.eE+-]+)s",
    "eval_scoring_time": r"^eval_scoring_time: ([0-9.eE+-]+)s",
    "calibration_time": r"^calibration_time: ([0-9.eE+-]+)s",
    "model_bytes": r"^model_bytes: (\d+)",
    "code_bytes": r"^code_bytes: (\d+)",
    "total_bytes": r"^total_bytes: (\d+)",
    "steps": r"^steps: (\d+)",
    "ttt": r"^ttt: (.*)$",
    "final": r"^final val_loss:(\S+) val_bpb:(\S+)",
}


def parse_log(text: str) -> dict[str, Any]:
    """The summary fields of a log written by `format_log` (missing ones are absent)."""
    out: dict[str, Any] = {}
    for key, pat in _LOG_PATTERNS.items():
        m = None
        for m in re.finditer(pat, text, flags=re.MULTILINE):
            pass  # the last occurrence counts
        if m is None:
            continue
        if key == "final":
            out["val_loss"], out["val_bpb"] = float(m.group(1)), float(m.group(2))
        elif key == "ttt":
            out["ttt"] = m.group(1).strip()
        elif key.endswith("_time"):
            out[key] = float(m.group(1))
        else:
            out[key] = int(m.group(1))
    return out


# ---------------------------------------------------------------------------- the script

_SCRIPT_HEAD = '''#!/usr/bin/env python3
"""train_gpt.py: a parameter-golf submission generated by `lmcore submission export`.

Self-contained: the lmcore modules below are embedded as source and imported from this
file by a meta-path importer (an installed lmcore is never used). Needs only the standard
library, torch, numpy, sentencepiece and brotli.

    torchrun --standalone --nproc_per_node=8 train_gpt.py [--run-dir DIR] [--set section.field=value ...]
    python train_gpt.py ...   # one process (CPU for the smoke config)

Trains (lmcore.train.train), packs (lmcore.pack.pack_run: model.int6.ptz) and evaluates
(lmcore.evaluate.eval_run: sliding window + score-first TTT; the plain sliding pass only
with --plain-pass) into the run folder, writes train_seed{SEED}.log there and prints the
final val_bpb. Code bytes = the size of this file.
"""
'''

_SCRIPT_BODY = r'''
import argparse
import importlib.abc
import importlib.util
import json
import linecache
import os
import sys
import time

_SELF = os.path.abspath(__file__)


class _EmbeddedLmcore(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `lmcore` and `lmcore.X` from the embedded sources; refuses any other lmcore module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "lmcore":
            return importlib.util.spec_from_loader(fullname, self, origin=_SELF + "/lmcore/__init__.py", is_package=True)
        if fullname.startswith("lmcore."):
            name = fullname.split(".", 1)[1]
            if name not in MODULES:
                raise ModuleNotFoundError(f"No module named {fullname!r} (not embedded in train_gpt.py)", name=fullname)
            return importlib.util.spec_from_loader(fullname, self, origin=_SELF + "/lmcore/" + name + ".py")
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        spec = module.__spec__
        module.__file__ = spec.origin
        if spec.name == "lmcore":
            module.__path__ = []
            module.__doc__ = "lmcore, embedded in train_gpt.py"
            module.__version__ = LMCORE_VERSION
            return
        src = _source(spec.name.split(".", 1)[1])
        linecache.cache[spec.origin] = (len(src), None, src.splitlines(True), spec.origin)
        exec(compile(src, spec.origin, "exec"), module.__dict__)


_SOURCES = {}


def _source(name):
    """A module's source: SOURCES holds every module's, as one Brotli-compressed, base85-encoded
    JSON object (one stream compresses better than one per module)."""
    import base64

    import brotli

    if not _SOURCES:
        _SOURCES.update(json.loads(brotli.decompress(base64.b85decode(SOURCES))))
    return _SOURCES[name]


def _install_importer():
    if not any(isinstance(f, _EmbeddedLmcore) for f in sys.meta_path):
        sys.meta_path.insert(0, _EmbeddedLmcore())


def main(argv=None):
    _install_importer()
    ap = argparse.ArgumentParser(description="Train, pack and evaluate the baked-in config (lmcore, embedded).")
    ap.add_argument("--run-dir", default=None, help="output folder (default: run_seed{SEED})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set train.seed=42 (repeatable)")
    ap.add_argument("--plain-pass", action="store_true",
                    help="also run the plain sliding-window pass before TTT (a diagnostic: TTT gain; adds eval time)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch.distributed as tdist
    import lmcore
    from lmcore import evaluate, pack, train
    from lmcore.config import Config
    from lmcore.runs import atomic_write_text, read_jsonl
    from lmcore.runtime import dist_from_env, init_distributed, pick_device, shutdown_distributed

    assert lmcore.__file__.startswith(_SELF), "lmcore must come from train_gpt.py"
    info = dist_from_env(os.environ)  # a command line: torchrun's variables are read here only
    cfg = Config.from_dict(json.loads(CONFIG_JSON), source="train_gpt.py").override(args.overrides)
    run_dir = args.run_dir or f"run_seed{cfg.train.seed}"
    progress = not args.no_progress
    device = pick_device(cfg.train.device, info.local_rank)
    init_distributed(info, device)  # one process group for train, the pack barrier and eval

    def barrier():
        if info.distributed:
            tdist.barrier()

    t0 = time.perf_counter()
    train.train(cfg, run_dir, info, progress=progress)
    barrier()
    if info.is_main:
        pack.pack_run(run_dir, progress=progress, code_bytes=os.path.getsize(_SELF))  # the code counted is this file
    barrier()
    ev = evaluate.eval_run(run_dir, dist=info, progress=progress, baseline=args.plain_pass)
    if info.is_main:
        rd = os.path.abspath(run_dir)
        load = lambda name: json.load(open(os.path.join(rd, name)))  # noqa: E731
        summary, pk = load("summary.json"), load("pack.json")
        log = format_log(summary, read_jsonl(os.path.join(rd, "metrics.jsonl")), pk, ev, pk["code_bytes"])
        atomic_write_text(os.path.join(rd, f"train_seed{cfg.train.seed}.log"), log)
        print(f"final val_loss:{ev['loss']:.8f} val_bpb:{ev['bpb']:.8f} "
              f"(total bytes {pk['total_bytes']:,}, wall {time.perf_counter() - t0:.1f}s)", flush=True)
    barrier()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def minify_source(src: str) -> str:
    """The module's code without docstrings and comments (ast round trip): same behaviour,
    fewer code bytes. Line numbers in tracebacks refer to this form."""
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def export_script(cfg: Config, pkg: Path = _PKG, minify: bool = True) -> str:
    """The text of the single-file `train_gpt.py` for `cfg` (see the module docstring)."""
    from lmcore import __version__

    cfg = cfg.validate()
    mods = needed_modules(cfg, pkg)
    bad = third_party_imports(mods, pkg) - ALLOWED_THIRD_PARTY - {"tqdm"}
    if bad:
        raise ValueError(f"the exported modules import {sorted(bad)}, beyond torch/numpy/sentencepiece/brotli")
    sources = {}
    for m in mods:
        src = (pkg / f"{m}.py").read_text(encoding="utf-8")
        sources[m] = minify_source(src) if minify else src
    # compressed as one stream: code bytes count against the 16,000,000-byte artifact
    blob = base64.b85encode(brotli.compress(json.dumps(sources).encode("utf-8"), quality=11)).decode("ascii")
    parts = [
        _SCRIPT_HEAD,
        f"LMCORE_VERSION = {__version__!r}\n",
        f"CONFIG_JSON = {cfg.to_json()!r}\n",
        f"MODULES = {tuple(mods)!r}\n",
        f"SOURCES = {blob!r}\n",
    ]
    parts.append(_LOG_SOURCE)
    parts.append(_SCRIPT_BODY)
    return "".join(parts)


def code_bytes_of_export(cfg: Config) -> int:
    """The submission's code bytes: the size in bytes of the exported train_gpt.py for `cfg`."""
    return len(export_script(cfg).encode("utf-8"))


# ---------------------------------------------------------------------------- export


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


# ---------------------------------------------------------------------------- check


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
        tag = f"seed {seed}"
        model = res.get("model_bytes") or 0
        sizes = {"submission.json model_bytes": model}
        art = d / f"model_seed{seed}.int6.ptz"
        if art.is_file():
            sizes["artifact file"] = art.stat().st_size
        lg = parse_log(log_seeds[seed].read_text(encoding="utf-8", errors="replace")) if seed in log_seeds else {}
        if "model_bytes" in lg:
            sizes["log model_bytes"] = lg["model_bytes"]
        for what, m in sizes.items():
            if m + code > SIZE_LIMIT:
                fails.append(f"{tag}: total bytes {m + code:,} (code {code:,} + model {m:,}, {what}) > {SIZE_LIMIT:,}")
        if res.get("artifact_bytes") is not None and res["artifact_bytes"] > SIZE_LIMIT:
            fails.append(f"{tag}: submission.json artifact_bytes {res['artifact_bytes']:,} > {SIZE_LIMIT:,}")
        if res.get("artifact_bytes") != model + code:
            fails.append(
                f"{tag}: submission.json artifact_bytes {res.get('artifact_bytes')} != model {model} + code {code}"
            )
        if seed not in log_seeds:
            continue
        lname = log_seeds[seed].name
        for key in ("train_time", "eval_time", "val_bpb", "val_loss", "ttt", "model_bytes"):
            if key not in lg:
                fails.append(f"{lname}: no {key} line")
        if lg.get("train_time", 0.0) > TIME_LIMIT_S:
            fails.append(f"{tag}: training took {lg['train_time']:.1f}s > {TIME_LIMIT_S:.0f}s ({lname})")
        if "eval_time" in lg:
            walls.append(lg["eval_time"])
        if "eval_scoring_time" in lg:
            scorings.append(lg["eval_scoring_time"])
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
        if "model_bytes" in lg and lg["model_bytes"] != model:
            fails.append(f"{tag}: submission.json model_bytes {model} disagrees with {lname} ({lg['model_bytes']})")
        for key, lkey in (
            ("train_seconds", "train_time"),
            ("eval_seconds", "eval_time"),
            ("eval_scoring_seconds", "eval_scoring_time"),
        ):
            if lkey in lg and res.get(key) is not None and abs(lg[lkey] - res[key]) > 0.01:
                fails.append(f"{tag}: submission.json {key} {res[key]} disagrees with {lname} ({lg[lkey]:.3f}s)")
    if per:
        for key in ("val_bpb", "val_loss"):
            vals = [float(r[key]) if r.get(key) is not None else math.nan for r in per.values()]
            m, s = _mean_std(vals)
            if sub.get(key) is None or not abs(m - sub[key]) <= tol:
                fails.append(f"submission.json: {key} {sub.get(key)} != mean of the seeds {m:.8f}")
            if len(vals) > 1 and (sub.get(f"{key}_std") is None or not abs(s - sub[f"{key}_std"]) <= tol):
                fails.append(f"submission.json: {key}_std {sub.get(f'{key}_std')} != std of the seeds {s:.8f}")
        mb = max(r.get("model_bytes") or 0 for r in per.values())
        if sub.get("bytes_total") != mb + code:
            fails.append(f"submission.json: bytes_total {sub.get('bytes_total')} != max model {mb} + code {code}")
        notes.append(
            f"{len(per)} seeds, val_bpb {float(sub.get('val_bpb') or math.nan):.6f}, max total bytes "
            f"{mb + code:,} <= {SIZE_LIMIT:,} (code {code:,} = size of train_gpt.py)"
        )
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
    verdict = lambda r: "passed" if r.passed else "NOT passed"  # noqa: E731
    notes = [f"{head}: {practice.statement}"]
    notes.append(f"significance: README bar {verdict(readme)}; maintainers' frontier bar {verdict(practice)}")
    if readme.passed:
        return [], [f"{head}: {readme.statement}", *notes]
    return [f"{head}: {readme.statement}"], notes


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
