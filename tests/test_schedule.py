"""lmcore.study.schedule, the GPU pool, on a CPU with a fake device list: a 4-variant sweep on
2 devices runs at most 2 runs at once, each with its own CUDA_VISIBLE_DEVICES, and a failing
variant is recorded while the others finish; jobs that need 2 GPUs queue for a pair; one
progress line per state change; bad pools refused before anything runs."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from lmcore import study
from lmcore.errors import InputError
from lmcore.study import sweeps
from lmcore.study.schedule import Job, last_line, run_pool

REPO = Path(__file__).resolve().parents[1]

# A stand-in for one run: records its CUDA_VISIBLE_DEVICES and start / end times, holds its
# devices a moment, leaves what a finished run leaves (or fails for the variant "bad").
STUB = textwrap.dedent("""\
    import json, os, pathlib, sys, time
    run_dir, variant, hold = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    start = time.time()
    time.sleep(hold)
    rec = {"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}
    (run_dir / "stub.json").write_text(json.dumps(rec))
    print("step 10/10 done")
    if variant == "bad":
        print("lmcore study: error: variant bad failed on purpose", file=sys.stderr)
        sys.exit(3)
    (run_dir / "eval.json").write_text(json.dumps({"bpb": 2.0, "loss": 3.0}))
""")


def _stub(tmp_path: Path) -> Path:
    p = tmp_path / "stub.py"
    p.write_text(STUB)
    return p


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_sweep_of_four_variants_on_a_fake_pool_of_two_devices(tmp_path: Path, monkeypatch):
    stub = _stub(tmp_path)
    monkeypatch.setattr(sweeps, "run_command",
                        lambda rd, **kw: [sys.executable, str(stub), str(rd), kw["variant"], "0.6"])
    lines: list[str] = []
    variants = {"a": ["model.bigram=none"], "bad": [], "c": ["model.bigram=hashed"], "d": []}
    df = study.sweep("pool", variants, preset="tiny", runs_dir=tmp_path / "runs", devices=["0", "1"],
                     root=REPO, log=lines.append)
    assert list(df["variant"]) == ["a", "bad", "c", "d"]
    assert list(df["status"]) == ["ok", "failed", "ok", "ok"]
    runs = tmp_path / "runs" / "pool"
    recs = {v: json.loads((runs / f"{v}-s1337" / "stub.json").read_text()) for v in variants}
    # each run saw exactly one device of the pool, and two runs at once never shared one
    assert all(r["cvd"] in ("0", "1") for r in recs.values())
    intervals = [(r["start"], r["end"]) for r in recs.values()]
    assert _max_overlap(intervals) == 2
    for v, r in recs.items():
        for w, q in recs.items():
            if v < w and r["start"] < q["end"] and q["start"] < r["end"]:
                assert r["cvd"] != q["cvd"], (v, w)
    # the failure is recorded in its run folder; the others finished
    failed = json.loads((runs / "bad-s1337" / "FAILED.json").read_text())
    assert failed["returncode"] == 3 and "failed on purpose" in failed["error"]
    assert "CUDA_VISIBLE_DEVICES=" in failed["command"] and failed["devices"] in (["0"], ["1"])
    assert json.loads((runs / "bad-s1337" / "study.json").read_text())["status"] == "failed"
    assert "failed on purpose" in df.set_index("variant").loc["bad", "error"]
    # the run's output is in its log, and the progress says each state change once
    assert "step 10/10 done" in (runs / "a-s1337" / "run.log").read_text()
    for v in variants:
        assert sum(f"pool/{v}-s1337: started on GPU " in ln for ln in lines) == 1
    assert sum("pool/bad-s1337: FAILED after" in ln for ln in lines) == 1
    assert sum(": finished in " in ln for ln in lines) == 3


def test_jobs_needing_two_gpus_queue_for_a_pair(tmp_path: Path):
    stub = _stub(tmp_path)
    jobs = []
    for name, k in (("wide1", 2), ("one", 1), ("wide2", 2)):
        d = tmp_path / name
        d.mkdir()
        jobs.append(Job(name, [sys.executable, str(stub), str(d), name, "0.3"], d / "run.log", num_gpus=k))
    res = run_pool(jobs, devices=[4, 5, 6], cwd=tmp_path, log=None)
    assert [r.status for r in res] == ["ok", "ok", "ok"]
    assert [r.devices for r in res][0] == ["4", "5"] and res[1].devices == ["6"]
    assert res[2].started >= min(res[0].finished, res[1].finished) - 0.05  # waited for a pair to free up
    assert json.loads((tmp_path / "wide1" / "stub.json").read_text())["cvd"] == "4,5"


def test_cpu_pool_runs_one_at_a_time_with_the_environment_unchanged(tmp_path: Path):
    stub = _stub(tmp_path)
    jobs = [Job(n, [sys.executable, str(stub), str(tmp_path), n, "0"], tmp_path / f"{n}.log", num_gpus=2)
            for n in ("x", "y")]
    res = run_pool(jobs, devices=["cpu"], log=None)
    assert [r.devices for r in res] == [["cpu"], ["cpu"]] and res[1].started >= res[0].finished
    assert res[0].command[0] == sys.executable  # no env prefix on a CPU


def test_bad_pools_are_refused_before_anything_runs(tmp_path: Path):
    job = Job("j", [sys.executable, "-c", "open('ran', 'w')"], tmp_path / "j.log", num_gpus=3)
    for devices, msg in ((["0", "1"], "num_gpus=3 but the pool has 2"), ([], "at least one device"),
                         (["0", "0", "1"], "listed twice")):
        with pytest.raises(InputError, match=msg):
            run_pool([job], devices=devices, cwd=tmp_path, log=None)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "j.log").exists()


def test_last_line(tmp_path: Path):
    f = tmp_path / "log"
    f.write_text("a\nlmcore x: error: first\nb\n\n")
    assert last_line(f) == "b" and last_line(f, "error") == "lmcore x: error: first"
    assert last_line(f, "nothing") == "b" and last_line(tmp_path / "none") is None
