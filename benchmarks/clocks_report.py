"""The GPU's clocks and power in each stage of a device job: `nvidia-smi`'s samples (a CSV that
benchmarks/speed.sh writes beside its results, `--format=csv,nounits`) split by the job log's
stage lines ("HH:MM:SS == NAME ..."), one row a stage. A sample counts as busy when the GPU's
utilization is at least --busy percent; the clock, power and temperature columns are medians
over busy samples, so a run's compile and start-up do not dilute them. "power capped" is the
share of busy samples with the driver's software power cap active (clocks lowered to stay under
the power limit).

With --profiles RES (speed.sh's results folder), a second table: the samples taken during each
profiled step (RES/RUN/profile/breakdown.json's `unix_s`, written since session 22) of a run on
GPU 0, beside its stage's busy median, to tell whether the profiled step ran at the clock of the
steady steps. nvidia-smi's timestamps are read as UTC, the device machines' time zone.

With --energy CSV (benchmarks/energy_sample.py's samples of the board's energy counter), one more column: the
stage's power while busy from the counter: the median over the intervals between its samples whose middle is
nearest a busy nvidia-smi sample of the stage of each interval's energy over its time. Unlike power.draw's single
readings each interval counts all its time. A median, not the busy intervals' mean: a stage's first busy samples
(compilation's short bursts, with the power still ramping) would pull a mean down (session 36: the original's
busy mean 603 W against 640-680 W in each 4 s of its steps).

    python benchmarks/clocks_report.py CLOCKS_CSV JOB_LOG [--busy 90] [--profiles RES] [--energy CSV]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

# a job log's stamped line ("HH:MM:SS ..."), and the stage's name where it is a stage line ("HH:MM:SS == NAME"),
# with the GPUs it runs on where the line names them ("== NAME (GPU 0,1, 47 s)")
STAMPED = re.compile(r"^(\d\d):(\d\d):(\d\d) (?:== (\S+)(?: \(GPU (\d+(?:,\d+)*))?)?")
# nvidia-smi heads a column with the field's full name, which differs from the short one queried
ALIASES = {"clocks.current.sm": "clocks.sm"}
NEEDED = ("timestamp", "clocks.sm", "power.draw", "power.limit", "temperature.gpu", "utilization.gpu")
# the driver names the power-cap reason one way or the other, by version
CAP_COLUMNS = ("clocks_event_reasons.sw_power_cap", "clocks_throttle_reasons.sw_power_cap")


def _seconds_of_day(h: int, m: int, s: float) -> float:
    return h * 3600 + m * 60 + s


def _unwrap(times: list[float]) -> list[float]:
    """Times of day in order, a day added at each step back past midnight."""
    out, day = [], 0.0
    for i, t in enumerate(times):
        if i and t + day < out[-1] - 12 * 3600:
            day += 86400
        out.append(t + day)
    return out


def stages(job_log: Path, until: float | None = None) -> list[tuple[str, float, float]]:
    """(name, start, end) of each stage line of the log, in seconds of the job's first day; a
    stage ends where the next begins, the last at the log's last stamped line or at `until` (the
    last sample's time, in seconds of the same day) where that is later: a job that never ended
    (the machine lost mid-run) keeps its last stage instead of losing it as one that took no
    time. Stages that took
    no time (within the log's one-second stamps) are left out, and so are the lines of runs on
    GPUs other than GPU 0, whose clocks are the ones sampled: a pair's second run, started beside
    GPU 0's in the same second, would otherwise take its name."""
    marks, last = [], None
    for line in job_log.read_text().splitlines():
        m = STAMPED.match(line)
        if not m:
            continue
        last = _seconds_of_day(*(int(g) for g in m.groups()[:3]))
        if m.group(4) and (m.group(5) is None or "0" in m.group(5).split(",")):
            marks.append((m.group(4), last))
    if not marks:
        return []
    times = _unwrap([t for _, t in marks] + [last])
    if until is not None and until > times[-1]:
        times[-1] = until
    return [(name, times[i], times[i + 1]) for i, (name, _) in enumerate(marks) if times[i + 1] > times[i]]


def _stamps(df: pd.DataFrame) -> pd.Series:
    """The `timestamp` column in nvidia-smi's layout (energy_sample.py writes the same)."""
    return pd.to_datetime(df["timestamp"], format="%Y/%m/%d %H:%M:%S.%f")


def _times(stamps: pd.Series) -> list[float]:
    """Seconds of the first stamp's day, a day added past each midnight."""
    return _unwrap((stamps - stamps.dt.normalize()).dt.total_seconds().tolist())


def samples(clocks_csv: Path) -> pd.DataFrame:
    """nvidia-smi's samples with a `t` column (seconds of the first sample's day) and a boolean
    `capped` column (False where the driver did not report the reason)."""
    df = pd.read_csv(clocks_csv, skipinitialspace=True)
    names = [re.sub(r"\s*\[.*\]$", "", c.strip()) for c in df.columns]  # "power.draw [W]" -> power.draw
    df.columns = [ALIASES.get(n, n) for n in names]
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise ValueError(f"{clocks_csv}: no column {', '.join(missing)} (columns: {', '.join(df.columns)})")
    stamps = _stamps(df)
    df["t"] = _times(stamps)
    df["unix"] = (stamps - pd.Timestamp("1970-01-01")).dt.total_seconds()  # read as UTC
    cap = next((c for c in CAP_COLUMNS if c in df.columns), None)
    df["capped"] = df[cap].astype(str).str.strip().eq("Active") if cap else False
    for c in NEEDED[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def energy_samples(energy_csv: Path) -> pd.DataFrame:
    """energy_sample.py's samples with `t` (seconds of the first sample's day) and `energy_mj`."""
    df = pd.read_csv(energy_csv, skipinitialspace=True)
    if list(df.columns) != ["timestamp", "energy_mj"]:
        raise ValueError(f"{energy_csv}: expected the columns timestamp, energy_mj (columns: {', '.join(df.columns)})")
    df["t"] = _times(_stamps(df))
    return df


def counter_watts(df: pd.DataFrame, en: pd.DataFrame, start: float, end: float, busy: float) -> float | None:
    """The median watts from the energy counter over the busy intervals of [start, end) (module docstring), or
    None."""
    e, d = en[(en.t >= start) & (en.t < end)], df[(df.t >= start) & (df.t < end)]
    if len(e) < 2 or d.empty:
        return None
    t, mj = e["t"].to_numpy(), e["energy_mj"].to_numpy(dtype=float)
    iv = pd.DataFrame({"mid": (t[:-1] + t[1:]) / 2, "s": t[1:] - t[:-1], "j": (mj[1:] - mj[:-1]) / 1000})
    near = pd.merge_asof(iv.sort_values("mid"), d[["t", "utilization.gpu"]].sort_values("t"), left_on="mid",
                         right_on="t", direction="nearest")
    b = near[(near["utilization.gpu"] >= busy) & (near["s"] > 0)]
    return float((b["j"] / b["s"]).median()) if not b.empty else None


def _in_stage(df: pd.DataFrame, start: float, end: float, busy: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The samples of [start, end) (seconds of the first day), and those of them at >= busy % utilization."""
    s = df[(df.t >= start) & (df.t < end)]
    return s, s[s["utilization.gpu"] >= busy]


def report(df: pd.DataFrame, spans: list[tuple[str, float, float]], busy: float,
           en: pd.DataFrame | None = None) -> str:
    head = ("| stage | samples | busy | SM MHz (median) | SM MHz (min) | power W (median) | power limit W "
            "| power capped | temp C |" + (" counter W (busy) |" if en is not None else ""))
    rows = [head, "|---" * head.count(" |") + "|"]
    for name, start, end in spans:
        s, b = _in_stage(df, start, end, busy)
        extra = ""
        if en is not None:
            w = counter_watts(df, en, start, end, busy)
            extra = f" {w:.1f} |" if w is not None else " - |"
        if b.empty:
            rows.append(f"| {name} | {len(s)} | 0 | - | - | - | - | - | - |" + extra)
            continue
        rows.append(f"| {name} | {len(s)} | {len(b)} | {b['clocks.sm'].median():.0f} | {b['clocks.sm'].min():.0f} "
                    f"| {b['power.draw'].median():.0f} | {b['power.limit'].median():.0f} "
                    f"| {100 * b['capped'].mean():.0f}% | {b['temperature.gpu'].median():.0f} |" + extra)
    return "\n".join(rows)


def _profile(run: Path) -> dict | None:
    """The run's profile breakdown where it says when the step ran (`unix_s`), else None."""
    try:
        info = json.loads((run / "profile" / "breakdown.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info.get("unix_s"), list) and len(info["unix_s"]) == 2 else None


def profile_report(df: pd.DataFrame, spans: list[tuple[str, float, float]], res: Path, busy: float) -> str:
    """The samples within each profiled step of the runs of `spans` (GPU 0's stages; see the module
    docstring), one row a run."""
    rows = ["| run | profiled step | wall ms | samples in the step | SM MHz in the step | power W in the step "
            "| stage SM MHz (median, busy) |", "|---|---|---|---|---|---|---|"]
    for name, start, end in spans:
        info = _profile(res / name)
        if info is None:
            continue
        a, b = info["unix_s"]
        s = df[(df.unix >= a) & (df.unix <= b)]
        _, st = _in_stage(df, start, end, busy)
        med = f"{st['clocks.sm'].median():.0f}" if not st.empty else "-"
        mhz = ", ".join(f"{v:.0f}" for v in s["clocks.sm"]) or "-"
        watts = ", ".join(f"{v:.0f}" for v in s["power.draw"]) or "-"
        rows.append(f"| {name} | {info.get('step', '-')} | {info.get('wall_ms', 0):.1f} | {len(s)} | {mhz} | {watts} | {med} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clocks_csv", type=Path)
    ap.add_argument("job_log", type=Path)
    ap.add_argument("--busy", type=float, default=90.0, help="utilization %% from which a sample is busy")
    ap.add_argument("--profiles", type=Path, default=None, metavar="RES",
                    help="also the samples within each profiled step of RES's runs on GPU 0")
    ap.add_argument("--energy", type=Path, default=None, metavar="CSV",
                    help="energy_sample.py's counter samples: each stage's power while busy (a median)")
    args = ap.parse_args(argv)
    for p in (args.clocks_csv, args.job_log):
        if not p.is_file():
            print(f"clocks_report: {p}: no such file", file=sys.stderr)
            return 2
    if args.energy is not None and not args.energy.is_file():
        print(f"clocks_report: {args.energy}: no such file", file=sys.stderr)
        return 2
    try:
        df = samples(args.clocks_csv)
        en = energy_samples(args.energy) if args.energy is not None else None
    except ValueError as e:  # a missing column, or a timestamp not in nvidia-smi's layout
        print(f"clocks_report: {e}", file=sys.stderr)
        return 2
    # the sampler starts with the job, so its times count from the log's first day too; a second past the last
    # sample (the log's stamps are whole seconds), so that a job that never ended keeps its last sample
    spans = stages(args.job_log, until=float(df["t"].max()) + 1 if not df.empty else None)
    if not spans:
        print(f"clocks_report: {args.job_log}: no stage lines ('HH:MM:SS == NAME')", file=sys.stderr)
        return 2
    print(report(df, spans, args.busy, en))
    if args.profiles is not None:
        print("\nGPU 0's samples within each profiled step (nvidia-smi every 500 ms; timestamps read as UTC):\n")
        print(profile_report(df, spans, args.profiles, args.busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
