"""The smoke study (`lmcore study smoke`, `make smoke`): 01_train (data, train, pack, eval),
the bigram ablation (3 runs) and 06_figures, each executed by Papermill on the CPU, offline,
in minutes; executed notebooks into the run folders under runs/smoke, figures into
runs/smoke/figures (figures/ holds the committed GPU study figures).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.runs import atomic_write_json
from lmcore.study.notebooks import run_notebook
from lmcore.study.paths import LogFn, now, print_line, resolve, root_of, say_to

__all__ = ["SMOKE_STUDY_OVERRIDES", "smoke_study"]

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


def smoke_study(
    *,
    runs_dir: str | Path = "runs/smoke",
    figures_dir: str | Path = "runs/smoke/figures",
    notebooks_dir: str | Path = "notebooks",
    overrides: Sequence[str] | None = None,
    stream: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> dict[str, Any]:
    """Run the smoke study (module docstring); returns {"figures": [paths], "notebooks":
    [...], "time_s": {...}} (also written to runs_dir/smoke.json); raises on failure."""
    say = say_to(log)
    r = root_of(root)
    ov = list(SMOKE_STUDY_OVERRIDES if overrides is None else overrides)
    runs, figs, nbs = resolve(runs_dir, r), resolve(figures_dir, r), resolve(notebooks_dir, r)
    t_all = time.perf_counter()
    steps = [
        ("train", "01_train.ipynb", runs / "train" / "notebook.ipynb",
         {"preset": "smoke", "overrides": ov, "seed": 1337, "num_gpus": 1, "run_dir": str(runs / "train")}),
        ("bigram ablation", "03_ablation_bigram.ipynb", runs / "bigram" / "notebook.ipynb",
         {"preset": "smoke", "overrides": ov, "seeds": [1337], "kinds": ["hashed", "product_key", "none"],
          "runs_dir": str(runs)}),
        ("figures", "06_figures.ipynb", runs / "figures.ipynb", {"runs_dir": str(runs), "figures_dir": str(figs)}),
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
    figures = sorted(str(p) for p in figs.glob("*")
                     if p.suffix in (".png", ".svg") and p.stat().st_mtime >= start_wall - 1)
    summary = {"runs_dir": str(runs), "figures_dir": str(figs), "figures": figures, "notebooks": written,
               "time_s": times, "overrides": ov, "finished": now()}
    atomic_write_json(runs / "smoke.json", summary)
    return summary
