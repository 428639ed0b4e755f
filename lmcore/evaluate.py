"""`lmcore eval`: the challenge score of a run, from its packed model alone (SPEC.md
section 6), written as eval.json, or as eval-NAME.json for an eval-only variant (an
eval-section setting tried on the same packed model, which is never retrained).

`eval_run` loads RUN/model.int6.ptz (lmcore.pack.load), applies eval overrides, and runs
the plain sliding-window pass (a diagnostic) and the score-first LatentMask TTT pass with
the `Evaluator` of lmcore.ttt. The engine's names (`Evaluator`, `sliding_eval`,
`ttt_eval`, ...), the window planning (lmcore.windows) and the one plain validation
(`plain_eval`, lmcore.validate) are re-exported here for callers that import them from
lmcore.evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmcore.bpb import ByteTables
from lmcore.errors import InputError, InputNotFound
from lmcore.model import GPT
from lmcore.runtime import ONE_PROCESS, DistInfo, dist_from_env, rank_slice, shutdown_distributed
from lmcore.ttt import Evaluator, LogFn, SignMomentum, sliding_eval, ttt_eval, ttt_lr
from lmcore.validate import plain_eval
from lmcore.windows import ChunkPlan, WindowPlan, plan_chunks, plan_windows

__all__ = [
    "ChunkPlan",
    "Evaluator",
    "SignMomentum",
    "WindowPlan",
    "eval_output",
    "eval_run",
    "plain_eval",
    "plan_chunks",
    "plan_windows",
    "rank_slice",
    "register_cli",
    "sliding_eval",
    "ttt_eval",
    "ttt_lr",
]


# ---------------------------------------------------------------------------- runs


def _load_packed(path: Path, device: torch.device, info: dict[str, Any] | None = None) -> tuple[GPT, Any]:
    from lmcore import pack

    return pack.load(path, device, info=info)


EVAL_NAME = r"[A-Za-z0-9._-]+"  # an eval-only variant's name: RUN/eval-NAME.json
_OUTPUT_RE = re.compile(rf"eval(-{EVAL_NAME})?\.json")


def eval_output(name: str | None) -> str:
    """The file an evaluation writes into the run folder: eval.json for None, else eval-NAME.json."""
    if name is None:
        return "eval.json"
    if not re.fullmatch(EVAL_NAME, name):
        raise InputError(f"eval variant name {name!r}: use letters, digits, '.', '_' or '-'")
    return f"eval-{name}.json"


def eval_run(
    run_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    ttt: bool | None = None,
    stride: int | None = None,
    device: str | torch.device = "auto",
    dist: DistInfo = ONE_PROCESS,
    progress: bool = True,
    baseline: bool = True,
    log: LogFn = print,
    write: bool = True,
    output: str = "eval.json",
) -> dict[str, Any]:
    """Evaluate the packed artifact of a run; writes run_dir/`output` (rank 0) and returns it.

    `output` is "eval.json" (the run's score) or "eval-NAME.json" (an eval-only variant, e.g. a
    TTT setting swept on the same packed model).

    The model comes only from `run_dir/model.int6.ptz` (via `lmcore.pack.load`); data,
    tokenizer and eval settings from the run's config, with `overrides`
    ("section.field=value"), `ttt` (None: cfg.eval.ttt) and `stride` applied. With
    `baseline` the plain sliding eval (no TTT) runs too and the TTT gain is recorded
    (a diagnostic pass: the score needs only the TTT pass).

    Attention: the stored config's backend if it runs on the device, else "auto"; a
    backend set with `overrides` (model.attention=...) is insisted on. eval.json's
    "attention" is {"requested", "used", "fallback": why requested was not used, or None}.

    Time (eval.json "time_s", seconds on this process; rank 0 writes eval.json): load
    (artifact, tokenizer tables, val tokens), compile, sliding (the plain pass, if run),
    ttt (the TTT scoring pass: ttt_score scoring + ttt_train mask training), and total:
    the wall time from the start of the artifact load to the final score.
    """
    from lmcore.data import load_val_tokens
    from lmcore.pack import set_attention
    from lmcore.runs import atomic_write_json
    from lmcore.runtime import card_name, git_commit, init_distributed, pick_device, use_bf16

    run_dir = Path(run_dir)
    if not _OUTPUT_RE.fullmatch(output):
        raise InputError(f"output={output!r}: expected eval.json or eval-NAME.json (NAME: letters, digits, . _ -)")
    if not run_dir.is_dir():
        raise InputNotFound(f"run folder not found: {run_dir}")
    artifact = run_dir / "model.int6.ptz"
    if not artifact.is_file():
        raise InputNotFound(f"{artifact}: packed model not found (run `lmcore pack` on {run_dir} first)")
    dev = device if isinstance(device, torch.device) else pick_device(device, dist.local_rank)
    init_distributed(dist, dev)
    t0 = time.perf_counter()
    loaded: dict[str, Any] = {}
    model, cfg = _load_packed(artifact, dev, info=loaded)
    stored_attention = cfg.model.attention
    extra = list(overrides or [])
    if stride is not None:
        extra.append(f"eval.stride={stride}")
    if ttt is not None:
        extra.append(f"eval.ttt={'true' if ttt else 'false'}")
    cfg = cfg.override(extra)
    model = model.to(dev)
    attention = loaded["attention"]
    if cfg.model.attention != stored_attention:  # asked for explicitly: no fallback
        try:
            attention = set_attention(model, cfg.model.attention, dev, strict=True)
        except ValueError as e:
            raise InputError(f"model.attention={cfg.model.attention}: {e}") from None
    backend = attention["used"]
    ecfg = cfg.eval
    tables = ByteTables.from_sentencepiece(cfg.data.tokenizer, cfg.model.vocab_size)
    tokens = load_val_tokens(cfg.data.data_dir, cfg.data.val_pattern, ecfg.seq_len, cfg.data.val_max_tokens, vocab_size=cfg.model.vocab_size)
    bf16 = use_bf16(dev, cfg.train.precision)
    load_s = time.perf_counter() - t0
    say: LogFn = log if dist.is_main else (lambda s: None)
    say(
        f"eval {artifact}: {tokens.numel() - 1:,} targets, seq_len {ecfg.seq_len}, stride {ecfg.stride}, "
        f"ttt {ecfg.ttt}, world {dist.world_size}, attention {backend}, bf16 {bf16}"
    )
    if attention["fallback"]:
        say(f"eval: attention {attention['requested']} cannot run here, using {backend} ({attention['fallback']})")
    ev = Evaluator(model, ecfg, tables, dev, bf16=bf16, dist=dist)
    if ev.compiled:
        say("eval: compiling (warm-up)...")
        ev.warmup(tokens)
        say(f"eval: compiled in {ev.compile_s:.1f}s")
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "artifact": str(artifact),
        "artifact_bytes": artifact.stat().st_size,
        "card": card_name(dev),
        "world_size": dist.world_size,
        "attention": attention,
        "bf16": bf16,
        "compiled": ev.compiled,
        "eval_config": dataclasses.asdict(cfg.eval),
        "val_tokens": int(tokens.numel() - 1),
        "load_s": load_s,
        "compile_s": ev.compile_s,
        "git_commit": git_commit(),
    }
    base = None
    if baseline or not ecfg.ttt:
        base = ev.run(tokens, ttt=False, progress=progress, log=say)
        out["sliding"] = base
        say(f"eval: sliding bpb {base['bpb']:.6f} loss {base['loss']:.6f} in {base['time_s']['total']:.1f}s")
    main = base
    if ecfg.ttt:
        res = ev.run(tokens, ttt=True, progress=progress, log=say)
        out["ttt"] = res
        main = res
        say(
            f"eval: ttt bpb {res['bpb']:.6f} loss {res['loss']:.6f} in {res['time_s']['total']:.1f}s "
            f"(score {res['time_s']['score']:.1f}s, train {res['time_s']['train']:.1f}s)"
        )
        if base is not None:
            out["ttt_gain_bpb"] = base["bpb"] - res["bpb"]
            out["chunk_gain_bpb"] = [b - t for b, t in zip(base["chunk_bpb"], res["chunk_bpb"])]
            say(f"eval: ttt gain {out['ttt_gain_bpb']:+.6f} bpb over sliding")
    assert main is not None
    for k in ("loss", "bpb", "tokens", "bytes", "chunks"):
        out[k] = main[k]
    out["time_s"] = {
        "load": load_s,
        "compile": ev.compile_s,
        "sliding": base["time_s"]["total"] if base else None,
        "ttt": out["ttt"]["time_s"]["total"] if "ttt" in out else None,
        "ttt_score": out["ttt"]["time_s"]["score"] if "ttt" in out else None,
        "ttt_train": out["ttt"]["time_s"]["train"] if "ttt" in out else None,
        "total": time.perf_counter() - t0,
    }
    if write and dist.is_main:
        atomic_write_json(run_dir / output, out)
        say(f"eval: wrote {run_dir / output}")
    return out


# ---------------------------------------------------------------------------- CLI


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    dist = dist_from_env(os.environ)  # the CLI is the only place reading the environment
    res = eval_run(
        args.run_dir,
        overrides=args.overrides,
        ttt=False if args.no_ttt else None,
        stride=args.stride,
        device=args.device,
        dist=dist,
        progress=not args.no_progress,
        baseline=not args.no_baseline,
        output=args.output,
    )
    if dist.is_main:
        keys = ("loss", "bpb", "tokens", "bytes", "chunks", "ttt_gain_bpb", "card", "world_size", "time_s")
        print(json.dumps({k: res.get(k) for k in keys}, indent=2))
        sys.stdout.flush()
    if dist.world_size > 1:
        shutdown_distributed()
    return 0


def register_cli(sub: Any) -> None:
    from lmcore.info import add_overrides_arg

    p = sub.add_parser(
        "eval",
        help="sliding-window + LatentMask TTT eval of a run's packed model; writes eval.json",
        description="Loads RUN_DIR/model.int6.ptz (the score counts only from the artifact), "
        "scores the validation split with sliding windows and score-first LatentMask TTT "
        "(SPEC section 6), and writes RUN_DIR/eval.json. Under torchrun the ranks split the work.",
    )
    p.add_argument("--run-dir", required=True, help="run folder holding model.int6.ptz (and its config)")
    p.add_argument("--no-ttt", action="store_true", help="sliding-window eval only, no test-time training")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the plain sliding eval (no TTT gain recorded); a submission's evaluation skips it, "
        "and its time counts in the wall time time_s.total",
    )
    p.add_argument("--stride", type=int, default=None, help="window stride (default: eval.stride of the config)")
    add_overrides_arg(p, "eval.ttt_epochs=2")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (default: auto)")
    p.add_argument(
        "--output",
        default="eval.json",
        metavar="FILE",
        help="file name in the run folder: eval.json (default) or eval-NAME.json for an eval-only variant",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-chunk progress lines")
    p.set_defaults(func=_cmd_eval)
