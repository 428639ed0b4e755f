"""The exported train_gpt.py's command line: train, pack and evaluate the baked-in config.

`main(argv, config_json=..., script=...)` is what `python train_gpt.py` (or torchrun)
runs once `lmcore.bootstrap` has put the embedded lmcore first on the import path. It
reads RANK / WORLD_SIZE / LOCAL_RANK (it is a command line: `dist_from_env(os.environ)`),
then trains, packs and evaluates exactly like lmcore (`lmcore.train.train`,
`lmcore.pack.pack_run` with the script's own size as the code bytes,
`lmcore.evaluate.eval_run`) and writes `train_seed{S}.log` (`lmcore.runlog.format_log`)
into the run folder. Its evaluation does only what the score needs (the TTT pass); the
plain sliding pass runs only with `--plain-pass`. Embedded in the script, so it imports
only the standard library, torch and lmcore modules the script embeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train, pack and evaluate the baked-in config (lmcore, embedded).")
    ap.add_argument("--run-dir", default=None, help="output folder (default: run_seed{SEED})")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set train.seed=42 (repeatable)",
    )
    ap.add_argument(
        "--plain-pass",
        action="store_true",
        help="also run the plain sliding-window pass before TTT (a diagnostic: TTT gain; adds eval time)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None, *, config_json: str, script: str) -> int:
    """Run the submission: `config_json` is the baked-in config, `script` the path of
    train_gpt.py (its size is the code bytes). Returns the exit status."""
    args = _parser().parse_args(argv)

    import torch.distributed as tdist

    from lmcore import evaluate, pack, train
    from lmcore.config import Config
    from lmcore.runlog import format_log
    from lmcore.runs import atomic_write_text, read_jsonl
    from lmcore.runtime import dist_from_env, init_distributed, pick_device, shutdown_distributed

    cfg = Config.from_dict(json.loads(config_json), source=os.path.basename(script)).override(args.overrides)
    info = dist_from_env(os.environ)  # a command line: torchrun's variables are read here only
    run_dir = Path(args.run_dir or f"run_seed{cfg.train.seed}")
    progress = not args.no_progress
    device = pick_device(cfg.train.device, info.local_rank)
    init_distributed(info, device)  # one process group for train, the pack barrier and eval

    def barrier() -> None:
        if info.distributed:
            tdist.barrier()

    t0 = time.perf_counter()
    train.train(cfg, run_dir, info, progress=progress)
    barrier()
    if info.is_main:
        pack.pack_run(run_dir, progress=progress, code_bytes=os.path.getsize(script))  # the code counted: the script
    barrier()
    ev = evaluate.eval_run(run_dir, dist=info, progress=progress, baseline=args.plain_pass)
    if info.is_main:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        pk = json.loads((run_dir / "pack.json").read_text(encoding="utf-8"))
        log = format_log(summary, read_jsonl(run_dir / "metrics.jsonl"), pk, ev, pk["code_bytes"])
        atomic_write_text(run_dir / f"train_seed{cfg.train.seed}.log", log)
        print(
            f"final val_loss:{ev['loss']:.8f} val_bpb:{ev['bpb']:.8f} "
            f"(total bytes {pk['total_bytes']:,}, wall {time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    barrier()
    shutdown_distributed()
    return 0
