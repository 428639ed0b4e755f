"""The device jobs' helpers, checked on CPU.

benchmarks/detached.sh's `original_alone`, which speed.sh, fa3_job.sh and capped_2gpu.sh use to
run the original script on FA3: .ref/ holds an FA2 shim named flash_attn_interface.py, and a
script's own folder comes first on sys.path, so the original run from .ref/ imports the shim
whatever PYTHONPATH says (capped_2gpu.sh did until session 12). Checked with a fake .ref/ and a
fake FA3 module. benchmarks/capped_report.py: capped_2gpu.sh's table from the committed logs.
speed.sh's job on a fake 2-GPU (and 1-GPU) machine, its runs stubbed: every stage, in order, to the end;
capped_2gpu.sh's likewise: a pair a seed, then the seeds' table."""

from __future__ import annotations

import os
import re
import signal
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import capped_report
import matmul_peak

CAPPED = ROOT / "benchmarks" / "results" / "capped-2026-11-29-h200-s12"
SHIM = "def flash_attn_func(q, k, v, causal=True):\n    return 'shim'\n"
FA3 = SHIM.replace("'shim'", "'fa3'") + "def flash_attn_with_kvcache(*a, **k):\n    return 'fa3'\n"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(cwd: Path, script: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": pythonpath}
    return subprocess.run(["bash", "-c", f"source {ROOT / 'benchmarks' / 'detached.sh'}; {script}"],
                          check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _original_says(script: Path, pythonpath: Path) -> str:
    """What the fake original prints: which flash_attn_interface it imported."""
    return subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True, timeout=60,
                          cwd=script.parent.parent, env={**os.environ, "PYTHONPATH": str(pythonpath)}).stdout.strip()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / ".ref").mkdir()
    (tmp_path / ".ref" / "seed_train_gpt.py").write_text("import flash_attn_interface as m\nprint(m.flash_attn_func(0, 0, 0))\n")
    (tmp_path / ".ref" / "run_seed.py").write_text("# helper\n")
    (tmp_path / ".ref" / "flash_attn_interface.py").write_text(SHIM)
    (tmp_path / "fa3").mkdir()
    (tmp_path / "fa3" / "flash_attn_interface.py").write_text(FA3)
    return tmp_path


@needs_bash
def test_the_original_run_from_ref_imports_the_shim_despite_pythonpath(tree: Path):
    assert _original_says(tree / ".ref" / "seed_train_gpt.py", tree / "fa3") == "shim"


@needs_bash
def test_original_alone_copies_the_script_where_it_imports_fa3(tree: Path):
    res = _bash(tree, f"original_alone alone {tree / 'fa3'} run_seed.py")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"the original imports FA3 from {tree / 'fa3' / 'flash_attn_interface.py'}" in res.stdout
    assert sorted(p.name for p in (tree / "alone").iterdir()) == ["run_seed.py", "seed_train_gpt.py"]
    assert _original_says(tree / "alone" / "seed_train_gpt.py", tree / "fa3") == "fa3"


@needs_bash
@pytest.mark.parametrize("where", ["shim", "none"])
def test_original_alone_fails_without_fa3(tree: Path, where: str):
    pp = str(tree / ".ref") if where == "shim" else ""
    res = _bash(tree, f"original_alone alone '{pp}' && echo RAN-ON", pythonpath=pp)
    assert res.returncode != 0 and "RAN-ON" not in res.stdout
    assert "alone: flash_attn_interface there is not FA3's" in res.stdout


def _detached(tree: Path, mode: str) -> subprocess.CompletedProcess:
    """benchmarks/detached.sh's detached_main on a job that prints a line, from tree/job.sh."""
    (tree / "job.sh").write_text(
        f"S={tree / 'scratch'}\nPOLL_S=30\njob() {{ echo the-job-ran; sleep 1; }}\ncollect() {{ :; }}\n"
        f"source {ROOT / 'benchmarks' / 'detached.sh'}\ndetached_main job.sh JOB \"$1\" || exit $?\n")
    return subprocess.run(["bash", "job.sh", mode], check=False, cwd=tree, capture_output=True, text=True, timeout=60)


@needs_bash
def test_a_detached_job_runs_to_done_and_a_poll_without_one_stops_at_once(tmp_path: Path):
    tree = tmp_path / "tree"
    tree.mkdir()
    res = _detached(tree, "start")
    assert res.returncode == 0 and "the-job-ran" in res.stdout and "JOB DONE" in res.stdout, res.stdout + res.stderr
    assert _detached(tree, "poll").stdout.strip().endswith("JOB DONE")  # a second poll: done, at once
    # a scratch folder that no start made (session 19 polled one for 470 s): poll and start stop at once
    (tree / "scratch").rename(tmp_path / "away")
    (tree / "scratch").mkdir()
    for mode in ("poll", "start"):
        res = _detached(tree, mode)
        assert res.returncode == 1 and "JOB: no job is running" in res.stdout, res.stdout + res.stderr
        assert "the-job-ran" not in res.stdout


@needs_bash
@pytest.mark.parametrize(("second", "rc"), [("true", 0), ("false", 1)])
def test_both_waits_for_its_two_commands_and_not_for_a_sampler(tmp_path: Path, second: str, rc: int):
    """speed.sh's pairs beside its clocks sampler, which never ends: with a bare `wait` the first
    pair hung until the device call ran out (session 20)."""
    script = (f"sleep 120 & sampler=$!; mark() {{ sleep 0.3; touch \"$1\"; }}; "
              f"both 'mark {tmp_path / 'a'}' 'mark {tmp_path / 'b'}'; echo first=$?; "
              f"both 'mark {tmp_path / 'c'}' '{second}'; echo second=$?; "
              f"kill -0 $sampler && echo sampler-alive; kill $sampler")
    res = _bash(tmp_path, script)  # times out (60 s) if both waits for the sampler
    assert res.stdout.split() == ["first=0", f"second={rc}", "sampler-alive"], res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


FAKE_SMI = """#!/usr/bin/env bash
# nvidia-smi on a fake machine of GPUS GPUs; its sampling mode (-lms) runs until killed, like the real one
case "$*" in
  *-L*) for i in $(seq 0 $((GPUS - 1))); do echo "GPU $i: fake"; done ;;
  *-lms*) echo "$$" > "$SMI_PID"; echo timestamp; exec sleep 300 ;;
  *) echo fake ;;
esac
"""


def _fake_machine(tmp_path: Path) -> tuple[Path, str]:
    """A job's scratch folder (its src/ this checkout) and a PATH whose nvidia-smi is FAKE_SMI."""
    fake, scratch = tmp_path / "bin", tmp_path / "scratch"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(FAKE_SMI)
    (fake / "nvidia-smi").chmod(0o755)
    scratch.mkdir()
    (scratch / "src").symlink_to(ROOT)
    return scratch, f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def _speed_job(tmp_path: Path, gpus: int) -> tuple[subprocess.CompletedProcess, list]:
    """speed.sh's `job` on CPU: a fake nvidia-smi, and setup, the runs and the kernel sources stubbed
    (each run prints speed.sh's run line); the stages, their pairs, the variants, the report."""
    scratch, path = _fake_machine(tmp_path)
    stubs = ('setup() { :; }; orig() { echo "== $1 (GPU $2, 0 s)"; sleep 0.3; }; '
             'lm() { echo "== $1 (GPU $3, 0 s)"; sleep 0.3; }; sources() { :; }')
    env = {**os.environ, "PATH": path, "GPUS": str(gpus), "SMI_PID": str(tmp_path / "smi.pid"), "STAGES": "orig1 lm1 orig2 lm2", "LM2": "after solo rv",
           "VARIANTS": "rv:train.x=1", "ONE_GPU_RUNS": "orig_fa3_1 lm_after_1", "PYTHONPATH": ""}
    proc = subprocess.Popen(["bash", "-c", f"source benchmarks/speed.sh job; S={scratch}; {stubs}; job"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a job that hangs: its sampler and runs go with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    runs = re.findall(r"^== (\S+) \(GPU ([\d,]+),", res.stdout, re.MULTILINE)
    return res, runs


@needs_bash
def test_the_speed_job_runs_every_stage_in_order_and_stops_its_sampler(tmp_path: Path):
    """The whole job on a fake 2-GPU machine: session 20's hung after its first pair (a bare `wait`
    waited for the clocks sampler), and no CPU test ran the job's stages before."""
    res, runs = _speed_job(tmp_path, gpus=2)
    assert res.returncode == 0 and "== done" in res.stdout, res.stdout + res.stderr
    pairs = [set(runs[i:i + 2]) for i in (0, 2, 4)]  # a pair's two lines come in either order
    assert pairs == [{("orig_fa3_1", "0"), ("orig_fa2_1", "1")}, {("lm_before_1", "0"), ("lm_before_1b", "1")},
                     {("lm_after_1", "0"), ("lm_solo_1", "1")}]
    assert runs[6:] == [("lm_v_rv_1", "0"), ("orig_fa3_2", "0,1"), ("lm_after_2", "0,1"), ("lm_solo_2", "0,1"),
                        ("lm_v_rv_2", "0,1")]
    pid = int((tmp_path / "smi.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the sampler was stopped with the job
        os.kill(pid, 0)
    assert (tmp_path / "scratch" / "res" / "speed_table.md").is_file()
    (tmp_path / "one").mkdir()  # one GPU: ONE_GPU_RUNS one at a time, the 2-rank stages skipped
    res, runs = _speed_job(tmp_path / "one", gpus=1)
    assert res.returncode == 0 and "== one GPU: the 2-rank stages are skipped" in res.stdout, res.stdout + res.stderr
    assert runs == [("orig_fa3_1", "0"), ("lm_after_1", "0"), ("lm_v_rv_1", "0")]


@needs_bash
@pytest.mark.parametrize(("wheel", "lm_fa3"), [("", "/tmp/fa3"), ("/x/flash_attn_3-dpsum.whl", "/tmp/fa3lm")])
def test_the_speed_job_runs_lmcore_on_its_own_fa3_build_only_when_given(tmp_path: Path, wheel: str, lm_fa3: str):
    """LM_FA3_WHL (train.fa3_xsa_rowsum's FA3_DPSUM build): lmcore's runs on it, the originals on .fa3/dist's
    (the FA2 shim's on none: its path starts with the site folder)."""
    scratch, path = _fake_machine(tmp_path)
    stubs = 'setup() { :; }; orig() { echo "orig $1 ${5%%:*}"; }; lm() { echo "lm $1 $LMFA3"; }; sources() { :; }'
    env = {**os.environ, "PATH": path, "GPUS": "2", "SMI_PID": str(tmp_path / "smi.pid"), "STAGES": "orig1 lm1 orig2",
           "LM1_PAIRS": "after", "LM_FA3_WHL": wheel, "PYTHONPATH": ""}
    res = subprocess.run(["bash", "-c", f"source benchmarks/speed.sh job; S={scratch}; {stubs}; job"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "== done" in res.stdout, res.stdout + res.stderr
    lines = set(re.findall(r"^(?:orig|lm) .*$", res.stdout, re.MULTILINE))
    assert lines == {"orig orig_fa3_1 /tmp/fa3", "orig orig_fa2_1 /tmp/site", "orig orig_fa3_2 /tmp/fa3",
                     f"lm lm_after_1 {lm_fa3}", f"lm lm_solo_1 {lm_fa3}"}, res.stdout


@needs_bash
@pytest.mark.parametrize("gpus", [2, 4])
def test_the_capped_job_runs_a_pair_a_seed_and_reports_over_the_seeds(tmp_path: Path, gpus: int):
    """capped_2gpu.sh's job on a fake machine, setup and the runs stubbed (the original writes its
    last lines, lmcore its summary.json): one pair a seed of SEEDS, in order, side by side on 4 GPUs,
    each seed's table, then the seeds' table (the report scripts run for real)."""
    scratch, path = _fake_machine(tmp_path)
    bpb = {"1337": ("1.6289", "1.5533"), "42": ("1.6301", "1.6251")}  # seed 42: only 0.0050 better
    case = lambda k: "case $3 in " + " ".join(f"{seed}) b={v[k]} ;;" for seed, v in bpb.items()) + " esac; "
    stubs = ("setup() { :; }; "
             "original() { echo \"run original $1 $3\"; " + case(0) +
             "echo \"step:461/20000 val_loss:2.7 val_bpb:$b train_time:150000ms step_avg:325.50ms\" > $2/original.log; }; "
             "lmcore_run() { echo \"run lmcore $1 $3\"; " + case(1) +
             "mkdir -p $2/lmcore_run; printf '{\"card\": \"fake\", \"attention_backend\": \"fa3\", \"steps\": 561, "
             "\"mean_step_ms\": 268.0, \"val_bpb_raw\": %s, \"val_bpb_ema\": 4.0}' $b > $2/lmcore_run/summary.json; }")
    env = {**os.environ, "PATH": path, "GPUS": str(gpus), "SEEDS": "1337 42", "PYTHONPATH": ""}
    res = subprocess.run(["bash", "-c", f"source benchmarks/capped_2gpu.sh job; S={scratch}; {stubs}; job"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "== done" in res.stdout, res.stdout + res.stderr
    runs = re.findall(r"^run (\w+) (\S+) (\d+)$", res.stdout, re.MULTILINE)
    lm_gpus = "2,3" if gpus == 4 else "0,1"
    assert [set(runs[0:2]), set(runs[2:4])] == [{("original", "0,1", s), ("lmcore", lm_gpus, s)} for s in ("1337", "42")]
    assert res.stdout.index("== seed 1337") < res.stdout.index("== seed 42") < res.stdout.index("== report")
    res_dir = scratch / "res"
    for seed, (orig, lm) in bpb.items():
        table = (res_dir / f"s{seed}" / "table.md").read_text().splitlines()
        assert f"seed {seed}," in table[0] and table[3].endswith(f"| {orig} | nan |") and f"| {lm} |" in table[4]
    assert (res_dir / "table.md").read_text() == (
        "| seed | original steps | original val_bpb | lmcore steps | lmcore val_bpb | lmcore - original |\n"
        "|---|---|---|---|---|---|\n"
        "| 42 | 461 | 1.6301 | 561 | 1.6251 | -0.0050 |\n"
        "| 1337 | 461 | 1.6289 | 561 | 1.5533 | -0.0756 |\n"
        "\n"
        "lmcore - original over 2 seed(s): mean -0.0403, sd 0.0499, worst -0.0050; at least 0.01 better at every seed: no\n")


def test_capped_seeds_table_needs_seed_folders(tmp_path: Path, capsys):
    assert capped_report.main(["--seeds-of", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"capped_report: {tmp_path}: no seed folders (sSEED)"


@needs_bash
@pytest.mark.parametrize("script", ["speed.sh", "capped_2gpu.sh"])
def test_jobs_run_their_pairs_with_both(script: str):
    """No bare `wait` in the jobs that run two things side by side (speed.sh's sampler runs all along)."""
    text = (ROOT / "benchmarks" / script).read_text()
    assert "both " in text
    assert not re.search(r"&\s*wait\b|\bwait\s*(;|$|\})", text, re.MULTILINE)


@pytest.mark.parametrize("job", ["switches", "defaults"])
def test_committed_capped_table_is_what_its_logs_give(job: str, capsys):
    # session 12's two capped_2gpu.sh jobs (NPROC=1, one H200): the table from the same logs
    d = CAPPED / job
    assert capped_report.main([str(d / "original.log"), str(d / "lmcore_run" / "summary.json"), "1", "150", "1"]) == 0
    assert capsys.readouterr().out == (d / "table.md").read_text()


@pytest.mark.parametrize("job, row", [
    ("capped-2026-11-29-h200x2-s19", "| original | FA3 (the wheel's flash_attn_interface) | 461 | 325.5 | 1.6289 | 5.6377 |"),
    ("capped-2026-11-30-h200x2-s29/s1337", "| lmcore `record` | fa3 | 592 | 253.8 | 1.5450 | 3.6259 |")])
def test_committed_2_rank_capped_table_is_what_its_logs_give(capsys, job: str, row: str):
    # capped_2gpu.sh jobs (2 ranks, one x2 H200 host, one run after the other): issue 16's check; session 19's,
    # and session 29's seed 1337 with session 26's set + train.fa3_dq_accum
    d = ROOT / "benchmarks" / "results" / job
    assert capped_report.main([str(d / "original.log"), str(d / "lmcore_run" / "summary.json"), "2", "150", "2"]) == 0
    out = capsys.readouterr().out
    assert out == (d / "table.md").read_text()
    assert row in out.splitlines()


def test_capped_table_without_the_originals_last_lines():
    summary = {"card": "H", "attention_backend": "fa3", "steps": 9, "mean_step_ms": 1.25, "val_bpb_raw": 2.0,
               "val_bpb_ema": 3.0}
    log = "step:4/20000 val_loss:3.1 val_bpb:2.5 train_time:400ms step_avg:100.00ms\n"
    lines = capped_report.table(log, summary, 4, "150", 2).splitlines()
    assert lines[0] == ("card: H; 2 rank(s) under torchrun (grad accum 4), record preset, 150 s cap, seed 1337, "
                        "proxy data; side by side on one 4-GPU host")
    assert lines[3] == "| original | FA3 (the wheel's flash_attn_interface) | 4 | 100.0 | 2.5000 | nan |"
    assert lines[4] == "| lmcore `record` | fa3 | 9 | 1.2 | 2.0000 | 3.0000 |"
    crashed = capped_report.table("Traceback\n", summary, 2, "150", 2).splitlines()
    assert crashed[0].endswith("one after the other") and crashed[3].startswith("| original | FA3 (the wheel's flash_attn_interface) | ? | nan | nan | nan |")


def test_sustained_matmuls_time_the_second_half(monkeypatch):
    # matmul_peak.sustained_tflops on a clock that moves 1/64 s at each reading: each half runs
    # batches of 10 matmuls until 4/64 s have passed (4 batches), and the rate is the second
    # half's matmuls over its 5 readings' time
    ticks = iter(range(1000))
    monkeypatch.setattr(matmul_peak.time, "perf_counter", lambda: next(ticks) / 64)
    assert matmul_peak.sustained_tflops(8, 4 / 64 * 2, device="cpu") == 2 * 8**3 * 40 / (5 / 64) / 1e12
    assert next(ticks) == 12  # two halves of 6 readings: the start, 4 checks, the end


@needs_bash
@pytest.mark.parametrize(("wheel", "first"), [("", "/tmp/site"), ("/x/flash_attn_3-dpsum.whl", "/tmp/fa3lm")])
def test_the_capped_jobs_lmcore_runs_on_its_own_fa3_build_only_when_given(tmp_path: Path, wheel: str, first: str):
    """capped_2gpu.sh's LM_FA3_WHL (train.fa3_xsa_rowsum in LM_SETS): lmcore's run imports FA3 from that
    build first; without it, from the site folder the original uses too."""
    env = {**os.environ, "LM_FA3_WHL": wheel, "LM_SETS": "train.fa3_xsa_rowsum=true", "PYTHONPATH": "/tmp/site:/src"}
    stub = 'timeout() { echo "pythonpath $PYTHONPATH"; echo "args $*"; }'
    res = subprocess.run(["bash", "-c", f"source benchmarks/capped_2gpu.sh job; {stub}; D=/d TOK=/t; "
                          f"lmcore_run 0,1 {tmp_path} 1337; cat {tmp_path}/lmcore.log"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split("pythonpath ")[1].split(":")[0] == first
    assert "--set train.fa3_xsa_rowsum=true" in res.stdout and "--set train.seed=1337" in res.stdout


@needs_bash
def test_run_until_ends_a_process_that_outlives_sigterm(tmp_path: Path):
    """Session 27: one of the original's torchrun ranks outlived run_until's SIGTERM by minutes and shared
    the GPUs with the next run. A child that ignores SIGTERM is killed once KILL_S has passed, and
    run_until returns only when nothing of the command's process group is left."""
    log, pgid = tmp_path / "run.log", tmp_path / "pgid"
    cmd = f"trap '' TERM; ps -o pgid= \\$\\$ > {pgid}; (sleep 60) & echo STOP; wait"  # $$: the command's shell
    t0 = time.monotonic()
    res = _bash(tmp_path, f'KILL_S=1 GRACE_S=0 run_until 60 {log} STOP bash -c "{cmd}"')
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t0 < 20
    assert "SIGKILL" in res.stderr
    group = int(pgid.read_text())
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing of the group is left


@needs_bash
def test_a_carried_dpsum_wheel_is_not_built_again_and_comes_back_tarred(tmp_path: Path):
    """fa3_dpsum_wheel (fa3_rowsum_check.sh, timeline_check.sh): a wheel in .fa3/dpsum (carried) skips the
    build; the wheel goes into OUT's tar either way (its '+' name would not come back itself)."""
    wheel = tmp_path / ".fa3" / "dpsum" / "flash_attn_3-3.0.0+lmcore.dpsum-cp310-abi3-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"wheel")
    (tmp_path / "out").mkdir()
    res = _bash(tmp_path, "fa3_dpsum_wheel out && tar -tf out/fa3_dpsum_wheel.tar")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "build_fa3" not in res.stdout and res.stdout.strip() == str(wheel.relative_to(tmp_path))


@needs_bash
def test_fa3_wheels_energy_runs_the_base_each_wheel_then_the_base_again(tmp_path: Path):
    """benchmarks/fa3_wheels_energy.sh on CPU, python3 and nvidia-smi stubbed: each wheel installed into its own
    folder named by its local version, digested against the base and benched, the base benched again last; a
    missing BASE is refused (exit 2) before anything runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("python3", "nvidia-smi"):
        (bin_ / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} PYTHONPATH=${{PYTHONPATH:-}} $*" >> {log}\n')
        (bin_ / tool).chmod(0o755)
    wheels = [tmp_path / f"flash_attn_3-3.0.0+lmcore.hd64bf16.dpsum{v}-cp310-abi3-linux_x86_64.whl"
              for v in ("", ".bwddqswap1")]
    for w in wheels:
        w.write_bytes(b"wheel")
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "FW_ENERGY_DIR": str(tmp_path / "energy")}
    script = str(ROOT / "benchmarks" / "fa3_wheels_energy.sh")
    res = subprocess.run(["bash", script], cwd=tmp_path, env={**env, "BASE": str(tmp_path / "none.whl")},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "BASE=" in res.stderr and not log.exists()
    res = subprocess.run(["bash", script], cwd=tmp_path, env={**env, "BASE": str(wheels[0]), "WHEELS": str(wheels[1])},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = []
    for line in log.read_text().splitlines():
        tool, path, args = line.split(" ", 2)
        what = "pip" if args.startswith("-m pip") else args.split()[0]
        steps.append((tool, path.removeprefix("PYTHONPATH=").split(":")[0], what))
    base, dqswap = "/tmp/fw/dpsum", "/tmp/fw/dpsum.bwddqswap1"
    assert steps == [("nvidia-smi", "", "--query-gpu=name,uuid,power.limit"), ("python3", "", "pip"),
                     ("python3", base, "benchmarks/fa3_digest.py"), ("python3", base, "benchmarks/energy_bench.py"),
                     ("python3", "", "pip"), ("python3", dqswap, "benchmarks/fa3_digest.py"),
                     ("python3", dqswap, "benchmarks/energy_bench.py"), ("python3", base, "benchmarks/energy_bench.py")]
    jsons = re.findall(r"--json \S+/(energy_\S+\.json)", log.read_text())
    assert jsons == ["energy_base.json", "energy_dpsum.bwddqswap1.json", "energy_base_after.json"]
    assert re.findall(r"--target (\S+)", log.read_text()) == ["/tmp/fw/dpsum", "/tmp/fw/dpsum.bwddqswap1"]
    assert "--save /tmp/fw_base.pt" in log.read_text() and "--compare /tmp/fw_base.pt" in log.read_text()
    with tarfile.open(tmp_path / "out" / "energy.tgz") as tar:  # the stubs write no JSON: the tables' tee files
        assert sorted(Path(n).name for n in tar.getnames() if n.endswith(".txt")) == [
            "energy_base.txt", "energy_base_after.txt", "energy_dpsum.bwddqswap1.txt"]


@needs_bash
@pytest.mark.parametrize(("overrides", "needs"), [
    ("train.fused_qkv=true train.fa3_xsa_rowsum=true", True), ("train.fa3_dq_accum=true", True),
    ("train.fa3_xsa_rowsum=1 train.expand_kv=true", True), ("train.fa3_xsa_rowsum=false", False),
    ("train.fused_qkv=true train.fused_softcap_ce=true", False), ("", False), ("train.mlp_zeroes_dq_accum=true", True),
])
def test_needs_dpsum_tells_the_overrides_that_run_only_on_the_fa3_dpsum_build(tmp_path: Path, overrides: str, needs: bool):
    # fa3_rowsum_check.sh does not start the speed job on plain FA3 with such a SOLO or LEVERS_FAIL (session 28's
    # first call: both lmcore runs died at their start)
    res = _bash(tmp_path, f'needs_dpsum "{overrides}"')
    assert res.returncode == (0 if needs else 1), res.stderr


def test_energy_per_call_divides_the_counters_difference_by_the_calls(monkeypatch):
    # energy_bench.energy_per_call on a clock that moves 1/8 s a reading and a counter that gains 3 mJ a call:
    # batches of 4 calls until 1 s has passed (8 batches, 32 calls), 0.096 J over 1 s, the clock read once
    import energy_bench

    ticks, mj, clocks = iter(range(100)), [0], []
    monkeypatch.setattr(energy_bench.time, "perf_counter", lambda: next(ticks) / 8)
    fn = lambda: mj.__setitem__(0, mj[0] + 3)  # noqa: E731
    r = energy_bench.energy_per_call(fn, 1.0, lambda: mj[0], lambda: None, lambda: clocks.append(1) or 1755, batch=4)
    assert r == {"calls": 32, "ms": 1000 / 32, "j_per_call": 0.003, "watts": 0.096, "sm_mhz": 1755}
    assert clocks == [1] and next(ticks) == 9  # the start and one reading a batch
    assert energy_bench.above_idle(r, 0.064) == pytest.approx(0.003 - 0.064 / 32)


def test_energy_bench_attention_rows_run_and_take_the_gradients(monkeypatch):
    # energy_bench.attention_rows on CPU with a stand-in flash_attn_interface (causal SDPA over (B, T, H, D), returning
    # (out, lse) as some builds do): every row runs at its shape, the backward row reaches q, k and v
    import types

    import energy_bench

    torch = pytest.importorskip("torch")
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((tuple(q.shape), causal, q.requires_grad))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return out.transpose(1, 2), None

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    rows = energy_bench.attention_rows(64, seq=32, heads=2, dim=8, device="cpu")
    assert list(rows)[:2] == ["FA3 forward", "FA3 forward and backward"] and len(rows) == 8
    shapes = {name: tuple(fn().shape) for name, fn in rows.items() if not name.startswith("FA3")}
    assert shapes["cuBLAS q/k/v 512 -> 1024: forward"] == (64, 1024)
    assert shapes["cuBLAS q/k/v 512 -> 1024: dW"] == (1024, 512)
    assert shapes["cuBLAS output projection 512 -> 512: dX"] == (64, 512)
    assert tuple(rows["FA3 forward"]().shape) == (2, 32, 2, 8)
    assert rows["FA3 forward and backward"]() is None
    assert calls == [((2, 32, 2, 8), True, False), ((2, 32, 2, 8), True, True)]


def test_energy_bench_memory_rows_run_at_records_shapes():
    # energy_bench.memory_rows on CPU (the q/k kernel's PyTorch math; the add + norm uncompiled): each row runs, the
    # copy writes the stream, the kernel rows give q's shapes and the norm's gradient
    import energy_bench

    torch = pytest.importorskip("torch")
    rows = energy_bench.memory_rows(64, seq=32, device="cpu", compiler=lambda f: f)
    assert list(rows) == ["copy of the residual stream (tokens, 512) bf16", "q's RMSNorm + RoPE + gain, forward",
                          "q's RMSNorm + RoPE + gain, backward", "inductor: residual add + RMSNorm"]
    y = rows["copy of the residual stream (tokens, 512) bf16"]()
    assert y.shape == (64, 512) and y.dtype == torch.bfloat16 and y.abs().sum() > 0
    out, rstd = rows["q's RMSNorm + RoPE + gain, forward"]()
    assert out.shape == (2, 32, 8, 64) and rstd.shape == (2, 32, 8)
    dx, dgain = rows["q's RMSNorm + RoPE + gain, backward"]()
    assert dx.shape == (2, 32, 8, 64) and dgain.shape == (8,)
    h, n = rows["inductor: residual add + RMSNorm"]()
    assert h.shape == n.shape == (64, 512)
    assert torch.allclose(n.float().pow(2).mean(-1), torch.ones(64), atol=0.02)


def test_session_45s_memory_rows_table_is_its_json():
    # results/energy-2026-12-03-h200-s45: table.md as the device call printed it, energy_memory.json as it wrote it
    import json

    import energy_bench

    res = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "energy-2026-12-03-h200-s45"
    data = json.loads((res / "energy_memory.json").read_text())
    lines = [line for line in (res / "table.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 1 + len(data["rows"])
    for line, (name, r) in zip(lines[1:], data["rows"].items()):
        assert line == energy_bench.table_row(name, r, data["idle_watts"])
    assert f"idle {data['idle_watts']:.1f} W" in (res / "table.md").read_text().splitlines()[0]
