"""One run in phases: data, train, pack, evaluate, each with its own overrides, each timed
into the run folder's study.json; `run_one` chains them.

Overrides. `train_phase` takes a preset and "section.field=value" overrides of any section
(they make config.json); `pack_phase` takes quant.* overrides, `eval_phase` eval.* overrides
(any other section is refused with an InputError naming the field: it would change what was
trained). `eval_phase(run, overrides=[...], name="x")` evaluates the existing packed model
(model.int6.ptz) with those settings into RUN/eval-x.json and never trains or packs: an
eval-only variant. In `run_one` the quant.* and eval.* items of `overrides` also reach the
pack and eval phases, and with `if_exists="reuse"` each phase reruns only when its own part
of the config changed: training when model / data / train differ (eval.ttt_lr never
retrains), packing when quant differs, evaluation when eval differs.

Where a phase runs. Training and packing read the data paths of the config, which are
relative to the repository root, and nothing here changes the working directory. So a phase
runs in this process only when it needs one device and this process's working directory is
the repository root (the command line, a pool job, the tests); otherwise (a notebook kernel,
whose working directory is notebooks/) it runs as a subprocess started in the root:
`python -m lmcore train|pack|eval ...`, and with num_gpus > 1 training and evaluation run as
`python -m torch.distributed.run --standalone --nproc_per_node=N -m lmcore ...` (torchrun),
their output streamed line by line. A notebook kernel never hosts a model or a rank. A phase
that fails writes FAILED.json (phase, error, traceback) and raises: InputError with the
subprocess's one-line error for bad input, else RuntimeError.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.config import Config, is_smoke_config
from lmcore.config import preset as make_preset
from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_json
from lmcore.study.folders import clear_run, failure_info, read_study, record_failure, set_aside, update_study
from lmcore.study.paths import LogFn, now, print_line, resolve, root_of, say_to
from lmcore.study.results import load_run

__all__ = [
    "IF_EXISTS",
    "check_sections",
    "eval_file",
    "eval_phase",
    "eval_settings",
    "lmcore_command",
    "make_config",
    "pack_phase",
    "prepare_data",
    "run_config",
    "run_one",
    "stream_command",
    "train_phase",
]

IF_EXISTS = ("replace", "reuse", "error")
PHASE_SECTIONS = {"pack": ("quant",), "eval": ("eval",)}


# ---------------------------------------------------------------------------- configs


def make_config(preset: str = "smoke", *, overrides: Sequence[str] = (), seed: int | None = None) -> Config:
    """A preset with `overrides` ("section.field=value") and the seed applied."""
    return make_preset(preset, with_seed(overrides, seed))


def with_seed(overrides: Sequence[str], seed: int | None) -> list[str]:
    return [*overrides, f"train.seed={int(seed)}"] if seed is not None else list(overrides)


def _section(override: str) -> str:
    return override.split("=", 1)[0].strip().split(".", 1)[0]


def check_sections(overrides: Sequence[str], phase: str) -> list[str]:
    """`overrides` as a list, or InputError naming the first one outside the phase's
    sections (pack: quant, eval: eval)."""
    allowed = PHASE_SECTIONS[phase]
    for o in overrides:
        if not isinstance(o, str) or "=" not in o or "." not in o.split("=", 1)[0]:
            raise InputError(f"{phase} override {o!r}: expected section.field=value")
        if _section(o) not in allowed:
            field = o.split("=", 1)[0].strip()
            raise InputError(f"{phase} override {field}: the {phase} phase takes only "
                             f"{', '.join(s + '.*' for s in allowed)} fields ({field} would change the trained "
                             "model: set it in the training overrides)")
    return list(overrides)


def _items(overrides: Sequence[str], section: str) -> list[str]:
    return [o for o in overrides if _section(o) == section]


def eval_file(name: str | None) -> str:
    """eval.json for name None, else eval-NAME.json (the rule is lmcore.evaluate's)."""
    from lmcore.evaluate import eval_output  # torch: imported when a phase needs it

    return eval_output(name)


def prepare_data(cfg: Config, *, root: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the offline smoke corpus when `cfg` uses the smoke data paths, else check the
    shards and tokenizer of cfg.data (paths relative to the repository root); returns what
    was found (and the time it took)."""
    r = root_of(root)
    t0 = time.perf_counter()
    data_dir, tokenizer = resolve(cfg.data.data_dir, r), resolve(cfg.data.tokenizer, r)
    if is_smoke_config(cfg):
        from lmcore.smoke_data import ensure_smoke_data

        info = dict(ensure_smoke_data(data_dir, tokenizer, progress=progress))
    else:
        from lmcore.data import check_dir

        info = dict(check_dir(data_dir, cfg.model.vocab_size))
        if not tokenizer.is_file():
            raise InputNotFound(f"tokenizer not found: {tokenizer} (data.tokenizer)")
    info["data_dir"] = str(data_dir)
    info["time_s"] = round(time.perf_counter() - t0, 3)
    if progress:
        print_line(f"data: {info['data_dir']} ready in {info['time_s']:.1f}s")
    return info


# ---------------------------------------------------------------------------- subprocesses


def lmcore_command(num_gpus: int, *args: str) -> list[str]:
    """`python -m lmcore ARGS` with this interpreter, under torchrun for num_gpus > 1
    (`python -m torch.distributed.run` is torchrun, without a PATH lookup)."""
    if num_gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(num_gpus)}",
                "-m", "lmcore", *args]
    return [sys.executable, "-m", "lmcore", *args]


def set_args(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def stream_command(cmd: Sequence[str], cwd: str | Path, log: LogFn | None = print_line) -> tuple[int, str | None]:
    """Run `cmd` in `cwd`, passing each line of its output (stdout + stderr) to `log` as it
    comes; returns the exit status and the last "lmcore ...: error: ..." line (or None).
    Interrupted (Ctrl-C in a notebook), the subprocess is terminated before re-raising."""
    say = say_to(log)
    say("$ " + " ".join(cmd))
    error = None
    with subprocess.Popen(list(cmd), cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("lmcore ") and ": error: " in line:
                    error = line.split(": error: ", 1)[1]
                say(line)
            return proc.wait(), error
        except BaseException:
            proc.terminate()
            proc.wait()
            raise


def _launch(cmd: list[str], root: Path, log: LogFn | None, what: str) -> None:
    rc, error = stream_command(cmd, root, log)
    if rc == 0:
        return
    if error is not None:
        raise InputError(error)
    raise RuntimeError(f"{what} exited with status {rc} (its output is above)")


def _here(num_gpus: int, root: Path) -> bool:
    """Whether a phase may run in this process (see the module docstring)."""
    return num_gpus == 1 and Path.cwd().resolve() == root


def _progress(progress: bool) -> list[str]:
    return [] if progress else ["--no-progress"]


# ---------------------------------------------------------------------------- phases


def _plain(section: Any) -> Any:
    """A config section as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(section)))


def trained_with(run_dir: Path, cfg: Config) -> bool:
    """Whether run_dir holds a completed training of `cfg` (its eval and quant sections
    aside: they belong to the pack and eval phases)."""
    try:
        saved = Config.load(run_dir / "config.json")
        summ = json.loads((run_dir / "summary.json").read_text())
    except (ValueError, OSError):
        return False
    same = dataclasses.replace(saved, quant=cfg.quant, eval=cfg.eval) == cfg
    return same and bool(summ.get("completed")) and (run_dir / "model.pt").is_file()


def train_phase(
    run_dir: str | Path,
    *,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seed: int | None = None,
    num_gpus: int = 1,
    study: str | None = None,
    variant: str | None = None,
    if_exists: str = "replace",
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> Path:
    """Train preset + overrides (+ seed) into `run_dir`; returns the absolute run folder.

    `if_exists`: "replace" moves a finished earlier run into a backup subfolder (and
    deletes an unfinished one's files), "reuse" keeps a finished training of the same
    model / data / train config, "error" lets train refuse a used folder.
    """
    if if_exists not in IF_EXISTS:
        raise InputError(f"if_exists={if_exists!r}: expected replace, reuse or error")
    r = root_of(root)
    ov = with_seed(overrides, seed)
    cfg = make_preset(preset, ov)
    rd = resolve(run_dir, r)
    if if_exists == "reuse" and trained_with(rd, cfg):
        say_to(log)(f"train: reusing {rd} (finished, same model, data and train config)")
        return rd
    if if_exists == "replace":
        clear_run(rd, log)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "FAILED.json").unlink(missing_ok=True)
    update_study(rd, study=study, variant=variant, preset=preset, overrides=list(overrides), seed=cfg.train.seed,
                 num_gpus=int(num_gpus), attention=cfg.model.attention, status="training", started=now())
    t0 = time.perf_counter()
    try:
        if _here(num_gpus, r):
            from lmcore.train import train

            train(cfg, rd, progress=progress)
        else:
            cmd = lmcore_command(num_gpus, "train", "--preset", preset, *set_args(ov), "--run-dir", str(rd),
                                 *_progress(progress))
            _launch(cmd, r, log, "lmcore train")
    except BaseException as e:
        record_failure(rd, "train", e)
        raise
    update_study(rd, status="trained", phases={"train": round(time.perf_counter() - t0, 3)})
    return rd


def run_config(rd: Path) -> Config:
    """The run folder's config.json (InputNotFound when the run was not trained)."""
    if not (rd / "config.json").is_file():
        raise InputNotFound(f"{rd}: no config.json (train the run first)")
    return Config.load(rd / "config.json")


def pack_phase(
    run_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> dict[str, Any]:
    """Pack the trained run (model.int6.ptz + pack.json) with quant.* `overrides` on top of
    its config; returns pack.json."""
    ov = check_sections(overrides, "pack")
    r = root_of(root)
    rd = resolve(run_dir, r)
    quant = _plain(run_config(rd).override(ov).quant)
    t0 = time.perf_counter()
    try:
        if _here(1, r):
            from lmcore.pack import pack_run

            info = pack_run(rd, progress=progress, overrides=ov)
        else:
            _launch(lmcore_command(1, "pack", "--run-dir", str(rd), *set_args(ov), *_progress(progress)), r, log,
                    "lmcore pack")
            info = json.loads((rd / "pack.json").read_text())
    except BaseException as e:
        record_failure(rd, "pack", e)
        raise
    update_study(rd, status="packed", pack_overrides=ov, packed_quant=quant,
                 phases={"pack": round(time.perf_counter() - t0, 3)})
    return info


def packed_with(rd: Path, overrides: Sequence[str]) -> bool:
    """Whether run_dir holds an artifact packed with the quant config that `overrides` give."""
    if not ((rd / "model.int6.ptz").is_file() and (rd / "pack.json").is_file()):
        return False
    try:
        want = _plain(run_config(rd).override(list(overrides)).quant)
    except InputError:
        return False
    return read_study(rd).get("packed_quant") == want


def eval_settings(overrides: Sequence[str], ttt: bool | None) -> list[str]:
    """The eval phase's overrides: `overrides` (eval.* only, else InputError) and eval.ttt
    when `ttt` is not None."""
    ov = check_sections(overrides, "eval")
    return ov + ([f"eval.ttt={'true' if ttt else 'false'}"] if ttt is not None else [])


def evaluated_with(rd: Path, overrides: Sequence[str], name: str | None = None) -> bool:
    """Whether run_dir's eval.json (eval-NAME.json) was made with the eval config that
    `overrides` give."""
    try:
        done = json.loads((rd / eval_file(name)).read_text())
        want = _plain(run_config(rd).override(list(overrides)).eval)
    except (OSError, ValueError):
        return False
    return done.get("eval_config") == want


def eval_phase(
    run_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    name: str | None = None,
    ttt: bool | None = None,
    num_gpus: int = 1,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> dict[str, Any]:
    """Evaluate the run's packed model (model.int6.ptz) with eval.* `overrides` (`ttt`:
    None = the config's); returns what it wrote. `name` None writes eval.json, the run's
    score; a name writes eval-NAME.json beside it, an eval-only variant (an earlier
    eval-NAME.json is moved to a backup first; a failure writes FAILED-eval-NAME.json, and
    the run's own status is left alone). Never trains or packs."""
    ov = eval_settings(overrides, ttt)
    output = eval_file(name)
    r = root_of(root)
    rd = resolve(run_dir, r)
    if not (rd / "model.int6.ptz").is_file():
        raise InputNotFound(f"{rd / 'model.int6.ptz'}: packed model not found (pack the run first)")
    run_config(rd).override(ov)  # a bad value is refused here, before anything runs
    failed = rd / f"FAILED-{output}"
    if name is not None:
        set_aside(rd, [rd / output, failed], f"an earlier evaluation {name!r}", log)
    t0 = time.perf_counter()
    try:
        if _here(num_gpus, r):
            from lmcore.evaluate import eval_run

            info = eval_run(rd, overrides=ov, progress=progress, log=say_to(log), output=output)
        else:
            cmd = lmcore_command(num_gpus, "eval", "--run-dir", str(rd), "--output", output, *set_args(ov),
                                 *_progress(progress))
            _launch(cmd, r, log, "lmcore eval")
            info = json.loads((rd / output).read_text())
    except BaseException as e:
        if name is None:
            record_failure(rd, "eval", e)
        else:
            atomic_write_json(failed, failure_info("eval", e, variant=name, overrides=ov))
        raise
    took = round(time.perf_counter() - t0, 3)
    if name is None:
        update_study(rd, status="ok", eval_overrides=ov, phases={"eval": took}, finished=now())
    else:
        update_study(rd, evals={name: {"overrides": ov, "time_s": took, "finished": now()}})
    return info


# ---------------------------------------------------------------------------- one run


def run_one(
    run_dir: str | Path,
    *,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seed: int | None = None,
    pack_overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
    ttt: bool | None = None,
    num_gpus: int = 1,
    study: str | None = None,
    variant: str | None = None,
    pack: bool = True,
    evaluate: bool = True,
    if_exists: str = "replace",
    raise_errors: bool = True,
    progress: bool = True,
    root: str | Path | None = None,
    log: LogFn | None = print_line,
) -> dict[str, Any]:
    """One run end to end: data, train, pack, eval. Returns the run's row (`load_run`).

    `overrides` make the run's config; `pack_overrides` (quant.*) and `eval_overrides`
    (eval.*) apply to those phases only. With `raise_errors=False` a failure is only
    recorded (FAILED.json) and the row returned with status "failed".
    """
    r = root_of(root)
    rd = resolve(run_dir, r)
    say = say_to(log)
    try:
        try:
            pack_ov = _items(overrides, "quant") + check_sections(pack_overrides, "pack")
            eval_ov = _items(overrides, "eval") + eval_settings(eval_overrides, ttt)
            cfg = make_config(preset, overrides=overrides, seed=seed)
            data_s = prepare_data(cfg, root=r, progress=progress)["time_s"]
        except BaseException as e:
            rd.mkdir(parents=True, exist_ok=True)
            if if_exists == "replace":
                clear_run(rd, log)
            update_study(rd, study=study, variant=variant, preset=preset, overrides=list(overrides), seed=seed,
                         num_gpus=int(num_gpus))
            record_failure(rd, "config/data", e)
            raise
        train_phase(rd, preset=preset, overrides=overrides, seed=seed, num_gpus=num_gpus, study=study,
                    variant=variant, if_exists=if_exists, progress=progress, root=r, log=log)
        update_study(rd, phases={"data": data_s})
        reuse = if_exists == "reuse"
        if pack or evaluate:
            if reuse and packed_with(rd, pack_ov):
                say(f"pack: reusing {rd / 'model.int6.ptz'} (same quant config)")
            else:
                pack_phase(rd, overrides=pack_ov, progress=progress, root=r, log=log)
        if evaluate:
            if reuse and evaluated_with(rd, eval_ov):
                say(f"eval: reusing {rd / 'eval.json'} (same eval config)")
            else:
                eval_phase(rd, overrides=eval_ov, num_gpus=num_gpus, progress=progress, root=r, log=log)
        update_study(rd, status="ok" if evaluate else "packed" if pack else "trained", finished=now())
    except Exception as e:
        if raise_errors:
            raise
        say(f"run {rd} FAILED: {type(e).__name__}: {e}")
    return load_run(rd, rd.parent)
