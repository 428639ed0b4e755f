"""The GPU pool: independent jobs (subprocesses) spread over the GPUs of one node.

A job is a command (`python -m lmcore study run-one ...` for a run of a sweep or a seed
batch, `python -m lmcore eval ...` for an eval-only variant) that needs `num_gpus` devices.
`run_pool` starts jobs in order while enough devices are free, each with its own
`CUDA_VISIBLE_DEVICES` (the command is prefixed with `env CUDA_VISIBLE_DEVICES=2,3`, so the
logged command line is the one to rerun by hand); the others queue until devices free up.
A job's output (stdout and stderr) is appended to its log file. A job that fails (non-zero
exit) is recorded in its `failed_file` unless it wrote one itself, and the others go on.

Live progress: one line per state change, "[2/8] bigram/none-s1: started on GPUs 2,3 (2
running, 5 queued)", "... finished in 41.2s", "... FAILED after 3.1s (exit status 1):
<error> (log: PATH)", and every `heartbeat_s` one line per running job with its elapsed time
and the last line of its log.

Devices are the node's GPU ids as strings (`default_devices()`: one per visible CUDA
device); without CUDA the pool has one slot, "cpu", that each job takes whole and whose
jobs run with the environment unchanged. The device list is a parameter: a test passes a
fake one (["0", "1"]) to run a pool on a CPU.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from lmcore.errors import InputError
from lmcore.runs import atomic_write_json
from lmcore.study.folders import failure_info
from lmcore.study.paths import LogFn, print_line, say_to

__all__ = ["CPU", "Job", "JobResult", "default_devices", "last_line", "run_pool"]

CPU = "cpu"


def default_devices() -> list[str]:
    """The node's GPUs ("0", "1", ...), or one CPU slot ["cpu"] when there is no CUDA."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(n)] or [CPU]


@dataclass
class Job:
    """One command for the pool. `failed_file` (a JSON file) is written when the job fails
    and did not write it itself; `info` goes into it (e.g. {"phase": "eval"})."""

    name: str
    command: list[str]
    log_file: Path
    num_gpus: int = 1
    failed_file: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    """How a job went: status "ok" or "failed", its devices, start and end (time.time())."""

    name: str
    status: str
    devices: list[str]
    command: list[str]
    started: float
    finished: float
    returncode: int | None
    error: str | None
    log_file: str

    @property
    def elapsed_s(self) -> float:
        return self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "elapsed_s": round(self.elapsed_s, 3)}


def last_line(path: Path, pattern: str | None = None, tail_bytes: int = 16384) -> str | None:
    """The last non-empty line of a text file (the last one containing `pattern`, when
    given and found), read from its end; None for a missing or empty file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return None
    if pattern is not None:
        hits = [ln for ln in lines if pattern in ln]
        if hits:
            return hits[-1]
    return lines[-1] if lines else None


def _on(devs: Sequence[str]) -> str:
    return CPU if list(devs) == [CPU] else "GPU" + ("s " if len(devs) > 1 else " ") + ",".join(devs)


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    devices: list[str]
    started: float
    out: IO[str]


def _check(jobs: Sequence[Job], devs: list[str]) -> None:
    if not devs:
        raise InputError("devices=[]: the pool needs at least one device")
    if len(set(devs)) != len(devs):
        raise InputError(f"devices={devs}: a device is listed twice")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InputError(f"job names must be unique: {names}")
    for j in jobs:
        if j.num_gpus < 1:
            raise InputError(f"{j.name}: num_gpus={j.num_gpus} must be >= 1")
        if devs != [CPU] and j.num_gpus > len(devs):
            raise InputError(f"{j.name}: num_gpus={j.num_gpus} but the pool has {len(devs)} GPU(s) ({','.join(devs)})")


def run_pool(
    jobs: Sequence[Job],
    *,
    devices: Sequence[str | int] | None = None,
    cwd: str | Path | None = None,
    log: LogFn | None = print_line,
    heartbeat_s: float = 60.0,
    poll_s: float = 0.05,
) -> list[JobResult]:
    """Run `jobs` over `devices` (default: `default_devices()`); returns one JobResult per
    job, in job order. Jobs start in order as soon as enough devices are free (first in,
    first out). Ctrl-C (KeyboardInterrupt) terminates the running jobs, records them as
    failed ("interrupted") and re-raises."""
    devs = [str(d) for d in devices] if devices is not None else default_devices()
    _check(jobs, devs)
    say = say_to(log)
    need = (lambda j: 1) if devs == [CPU] else (lambda j: j.num_gpus)
    order = {d: i for i, d in enumerate(devs)}
    free, queue = list(devs), deque(jobs)
    running: list[_Running] = []
    results: dict[str, JobResult] = {}
    total = len(jobs)
    say(f"pool: {total} job(s) on {len(devs)} device(s) ({_on(devs)})")

    def start(job: Job) -> None:
        take = free[:need(job)]
        del free[:need(job)]
        cmd = list(job.command) if devs == [CPU] else ["env", f"CUDA_VISIBLE_DEVICES={','.join(take)}", *job.command]
        job.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(job.log_file, "a", encoding="utf-8")
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=str(cwd) if cwd is not None else None, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        running.append(_Running(job, proc, take, time.time(), out))
        say(f"[{len(results) + len(running)}/{total}] {job.name}: started on {_on(take)} "
            f"({len(running)} running, {len(queue)} queued)")

    def finish(r: _Running, rc: int | None, error: str | None = None) -> None:
        r.out.close()
        end = time.time()
        ok = rc == 0 and error is None
        if not ok and error is None:
            error = f"exit status {rc}: " + (last_line(r.job.log_file, "error") or "no output")
        res = JobResult(r.job.name, "ok" if ok else "failed", r.devices, list(r.proc.args), r.started, end, rc,
                        error, str(r.job.log_file))
        results[r.job.name] = res
        free.extend(r.devices)
        free.sort(key=order.__getitem__)
        if ok:
            say(f"[{len(results)}/{total}] {r.job.name}: finished in {res.elapsed_s:.1f}s")
        else:
            _record(r.job, res)
            say(f"[{len(results)}/{total}] {r.job.name}: FAILED after {res.elapsed_s:.1f}s ({error}) "
                f"(log: {r.job.log_file})")

    last_beat = time.time()
    try:
        while queue or running:
            while queue and need(queue[0]) <= len(free):
                start(queue.popleft())
            done = [(r, r.proc.poll()) for r in running]
            done = [(r, rc) for r, rc in done if rc is not None]
            for r, rc in done:
                running.remove(r)
                finish(r, rc)
            if heartbeat_s > 0 and running and time.time() - last_beat >= heartbeat_s:
                last_beat = time.time()
                for r in running:
                    say(f"  {r.job.name}: running {time.time() - r.started:.0f}s on {_on(r.devices)}: "
                        f"{(last_line(r.job.log_file) or '')[:160]}")
            if not done:
                time.sleep(poll_s)
    except BaseException:
        for r in running:
            r.proc.terminate()
        for r in running:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            finish(r, r.proc.returncode, "interrupted")
        raise
    return [results[j.name] for j in jobs]


def _record(job: Job, res: JobResult) -> None:
    """Write the job's failed_file unless the job wrote it itself during its run."""
    f = job.failed_file
    if f is None:
        return
    if f.is_file():
        try:
            if f.stat().st_mtime >= res.started - 1 and json.loads(f.read_text()).get("error"):
                return
        except (OSError, json.JSONDecodeError):
            pass
    info = failure_info(job.info.get("phase", "run"), res.error or "failed", **{
        k: v for k, v in job.info.items() if k != "phase"})
    info.update(returncode=res.returncode, command=shlex.join(res.command), devices=res.devices, log=res.log_file)
    atomic_write_json(f, info)
