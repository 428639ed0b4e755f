"""Tests of lmcore.submission: export of three smoke runs, the compliance check, and the
exported single-file train_gpt.py run outside lmcore (same val_bpb as the lmcore run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcore import cli
from lmcore.compliance import _significance
from lmcore.config import preset
from lmcore.evaluate import eval_run
from lmcore.export import export_script, needed_modules
from lmcore.pack import pack_run
from lmcore.runlog import parse_log
from lmcore.smoke_data import ensure_smoke_data
from lmcore.train import train
from tests.conftest import script_env

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3)


def _overrides(data: Path) -> list[str]:
    """The tiny preset (every phase in seconds) on a smoke corpus built in the test's folder."""
    return [f"data.data_dir={data}", f"data.tokenizer={data / 'tokenizer.model'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = ROOT / "data" / "smoke"
        ensure_smoke_data(data, data / "tokenizer.model", progress=False)
        base = tmp_path_factory.mktemp("sub_runs")
        dirs = []
        for s in SEEDS:
            cfg = preset("tiny", _overrides(data) + [f"train.seed={s}"])
            rd = base / f"s{s}"
            train(cfg, rd, progress=False)
            pack_run(rd, progress=False)
            eval_run(rd, progress=False, log=lambda m: None)
            dirs.append(rd)
    finally:
        torch.set_num_threads(n)
    return {"dirs": dirs, "base": base, "data": data}


@pytest.fixture(scope="module")
def export(runs):
    out = runs["base"] / "submission"
    args = [
        "submission",
        "export",
        "--runs",
        *map(str, runs["dirs"]),
        "--out",
        str(out),
        "--name",
        "t",
        "--author",
        "me",
    ]
    assert cli.main(args) == 0
    return out


def _check(folder: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = cli.main(["submission", "check", str(folder), *extra])
    return rc, capsys.readouterr().out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_export_files_and_check_passes(export, runs, capsys):
    names = {p.name for p in export.iterdir()}
    assert {"train_gpt.py", "README.md", "submission.json", *(f"train_seed{s}.log" for s in SEEDS)} <= names
    sub = json.loads((export / "submission.json").read_text())
    code = (export / "train_gpt.py").stat().st_size
    assert sub["code_bytes"] == code and f"{code:,}" in (export / "README.md").read_text()
    assert sub["seeds"] == list(SEEDS)
    for s, rd in zip(SEEDS, runs["dirs"]):
        ev = json.loads((rd / "eval.json").read_text())
        pk = json.loads((rd / "pack.json").read_text())
        r = sub["seed_results"][str(s)]
        assert r["val_bpb"] == ev["bpb"] and r["artifact_bytes"] == pk["model_bytes"] + code
        # pack.json counted exactly the train_gpt.py that the export wrote (seeds 1-3: same length)
        assert pk["code_bytes"] == code and pk["total_bytes"] == r["artifact_bytes"], (pk["code_bytes"], code)
        lg = parse_log((export / f"train_seed{s}.log").read_text())
        assert abs(lg["val_bpb"] - ev["bpb"]) < 1e-7 and lg["ttt"].startswith("score-first")
        # eval_time is the wall time from the artifact load to the final score; the scoring pass apart
        assert lg["eval_time"] == pytest.approx(ev["time_s"]["total"], abs=1e-3) == r["eval_seconds"]
        assert lg["eval_scoring_time"] == pytest.approx(ev["time_s"]["ttt"], abs=1e-3) == r["eval_scoring_seconds"]
        assert lg["calibration_time"] == pytest.approx(pk["calibration_time_s"], abs=1e-3)
        assert "plain pass" in (export / f"train_seed{s}.log").read_text()  # lmcore eval ran it (the default)
    assert sub["ttt"]["declared"] and sub["ttt"]["score_first"]
    rc, out = _check(export, capsys)
    assert rc == 0, out
    assert out.startswith("PASS") and "NOTE evaluation time: wall max" in out and "scoring pass alone" in out, out
    # a reference far worse than the runs: both bars are stated, and both pass
    rc, out = _check(export, capsys, "--reference-loss", str(sub["val_loss"] + 1.0))
    assert rc == 0, out
    assert "NOTE significance (reference val_loss" in out and "README bar (0.005 nats, p < 0.01)" in out, out
    assert "maintainers' frontier bar (p < 0.25, #1902)" in out
    assert "README bar passed; maintainers' frontier bar passed" in out
    # the runs' own score as the reference: the README bar fails (a FAIL line), the other is a note
    rc, out = _check(export, capsys, "--reference-bpb", str(sub["val_bpb"]))
    assert rc == 1, out
    fail = [x for x in out.splitlines() if x.startswith("FAIL")]
    assert len(fail) == 1 and "README bar" in fail[0] and "does NOT pass" in fail[0], out
    assert "NOTE significance" in out and "maintainers' frontier bar" in out
    # per-seed reference losses, pooled
    worse = [str(sub["val_loss"] + d) for d in (0.9, 1.0, 1.1)]
    rc, out = _check(export, capsys, "--reference-losses", *worse)
    assert rc == 0 and "reference val_loss of 3 seeds, pooled" in out and "(std 0.10000, 3 seeds)" in out, out


def test_significance_states_both_bars():
    """An improvement of 0.004 nats with a small spread: below the README's 0.005-nat bar
    (a failure), above the maintainers' p < 0.25 bar (a note); both say which bar."""
    per = {str(i): {"val_loss": v, "val_bpb": v / 2} for i, v in enumerate((2.500, 2.502, 2.498))}
    fails, notes = _significance(per, None, 2.504, None)
    assert len(fails) == 1 and "README bar (0.005 nats, p < 0.01)" in fails[0] and "does NOT pass" in fails[0]
    assert any("maintainers' frontier bar (p < 0.25, #1902)" in n and "PASSES" in n for n in notes), notes
    assert "significance: README bar NOT passed; maintainers' frontier bar passed" in notes


def test_check_fails_inflated_artifact(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    (d / "model_seed2.int6.ptz").write_bytes(b"\0" * 16_000_001)
    rc, out = _check(d, capsys)
    assert rc == 1 and "seed 2: total bytes" in out and "artifact file" in out, out
    # inflated byte count in submission.json and the log
    d2 = tmp_path / "copy2"
    shutil.copytree(export, d2)
    sub = json.loads((d2 / "submission.json").read_text())
    sub["seed_results"]["1"]["model_bytes"] = 16_000_000
    (d2 / "submission.json").write_text(json.dumps(sub))
    rc, out = _check(d2, capsys)
    assert rc == 1 and "seed 1: total bytes" in out and "> 16,000,000" in out, out


def test_check_fails_601s_training(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    log = d / "train_seed3.log"
    text = log.read_text()
    import re

    log.write_text(re.sub(r"^train_time: .*$", "train_time: 601.000s", text, flags=re.MULTILINE))
    rc, out = _check(d, capsys)
    assert rc == 1 and "seed 3: training took 601.0s > 600s" in out, out


def test_check_fails_val_bpb_disagreeing_with_logs(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    sub["seed_results"]["2"]["val_bpb"] += 0.01
    (d / "submission.json").write_text(json.dumps(sub))
    rc, out = _check(d, capsys)
    assert rc == 1 and "seed 2: submission.json val_bpb" in out and "disagrees with train_seed2.log" in out, out
    assert "val_bpb" in out and "mean of the seeds" in out


def test_check_judges_evaluation_by_the_wall_time(runs, tmp_path, capsys):
    """A run whose plain pass made the evaluation 701 s from load to score while its TTT
    pass took 450 s: the log shows every phase, and the check FAILS on the wall time."""
    rd = tmp_path / "slow"
    shutil.copytree(runs["dirs"][0], rd)
    ev = json.loads((rd / "eval.json").read_text())
    ev["time_s"].update(load=1.0, compile=0.0, sliding=250.0, ttt=450.0, ttt_score=200.0, ttt_train=249.5, total=701.0)
    (rd / "eval.json").write_text(json.dumps(ev))
    out = tmp_path / "sub"
    assert cli.main(["submission", "export", "--runs", str(rd), "--out", str(out)]) == 0
    capsys.readouterr()
    log = (out / f"train_seed{SEEDS[0]}.log").read_text()
    assert "eval_phases: load 1.000s, compile 0.000s, plain pass 250.000s" in log
    assert "ttt scoring 200.000s, ttt training 249.500s" in log
    assert "eval_time: 701.000s (wall" in log and "eval_scoring_time: 450.000s" in log
    rc, text = _check(out, capsys)
    assert rc == 1, text
    assert f"FAIL seed {SEEDS[0]}: evaluation took 701.0s > 600s (wall time" in text, text
    assert "the scoring pass alone took 450.0s" in text
    assert "NOTE evaluation time: wall max 701.0s" in text and "scoring pass alone max 450.0s" in text


def _check_error(folder: Path, capsys) -> str:
    """`lmcore submission check folder` must exit 2 with one error line; returns it."""
    assert cli.main(["submission", "check", str(folder)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore submission: error:") and not captured.out, captured
    return lines[0]


def test_check_bad_input_is_one_line_exit_2(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    sj = d / "submission.json"
    good = json.loads(sj.read_text())
    sj.write_text(json.dumps([good]))  # a JSON array
    line = _check_error(d, capsys)
    assert str(sj) in line and "expected a JSON object, got an array" in line, line
    bad = dict(good, code_bytes=str(good["code_bytes"]))  # a string where an integer belongs
    sj.write_text(json.dumps(bad))
    line = _check_error(d, capsys)
    assert str(sj) in line and "field code_bytes must be an integer, got a string" in line, line
    bad = json.loads(json.dumps(good))
    bad["seed_results"]["2"]["model_bytes"] = 1.5
    sj.write_text(json.dumps(bad))
    line = _check_error(d, capsys)
    assert str(sj) in line and "field seed_results.2.model_bytes must be an integer" in line, line
    # a file instead of the folder; a folder that does not exist
    line = _check_error(sj, capsys)
    assert str(sj) in line and "a submission folder is expected" in line, line
    line = _check_error(tmp_path / "nowhere", capsys)
    assert str(tmp_path / "nowhere") in line and "not found" in line, line


def test_missing_file_and_config_mismatch(export, runs, tmp_path, capsys):
    d = _copy(export, tmp_path)
    (d / "README.md").unlink()
    rc, out = _check(d, capsys)
    assert rc == 1 and "README.md: required file missing" in out
    other = tmp_path / "other"
    shutil.copytree(runs["dirs"][0], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["train"]["seed"] = 99
    cfg["train"]["iterations"] = 11
    (other / "config.json").write_text(json.dumps(cfg))
    rc = cli.main(["submission", "export", "--runs", str(runs["dirs"][1]), str(other), "--out", str(tmp_path / "x")])
    assert rc == 2 and "train.iterations" in capsys.readouterr().err


def test_needed_modules_record():
    mods = needed_modules(preset("record"))
    assert {"train", "pack", "evaluate", "model", "quant", "data"} <= set(mods)
    assert not {"study", "plots", "fineweb", "info", "cli", "smoke_data", "submission"} & set(mods)
    assert "smoke_data" in needed_modules(preset("smoke"))


def test_exported_script_is_self_contained_and_reproduces(export, runs, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copyfile(export / "train_gpt.py", work / "train_gpt.py")
    assert not (work / "lmcore").exists()
    # the embedded importer wins over the installed lmcore, and refuses modules not embedded
    probe = (
        "import os, sys, torch; before=set(sys.modules)\n"  # torch.hub itself imports tqdm when installed
        "import train_gpt; f = train_gpt.install(vars(train_gpt)); me = os.path.abspath(train_gpt.__file__)\n"
        "assert 'lmcore/submission.py' not in f.sources and 'lmcore/pack.py' in f.sources, sorted(f.sources)\n"
        "import lmcore, lmcore.train, lmcore.pack, lmcore.evaluate\n"
        "bad=[m for n,m in sys.modules.items() if n.startswith('lmcore') and not m.__file__.startswith(me)]\n"
        "assert not bad, bad\n"
        "try:\n import lmcore.study\nexcept ModuleNotFoundError as e: print('refused', e)\n"
        "heavy=[m for m in ('pandas','matplotlib','tqdm','huggingface_hub','papermill') if m in set(sys.modules) - before]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=work, env=script_env(), check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "refused" in r.stdout
    # without site-packages lmcore is not importable at all (nothing is in this folder)
    r = subprocess.run(
        [sys.executable, "-S", "-c", "import lmcore"], cwd=work, env=script_env(), check=False, capture_output=True, text=True
    )
    assert r.returncode != 0
    # run it: seed 2, the same data, on CPU in one process
    data = runs["data"]
    cmd = [
        sys.executable,
        "train_gpt.py",
        "--no-progress",
        "--set",
        "train.seed=2",
        "--set",
        f"data.data_dir={data}",
        "--set",
        f"data.tokenizer={data / 'tokenizer.model'}",
    ]
    r = subprocess.run(cmd, cwd=work, env=script_env(), check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rd = work / "run_seed2"
    ev = json.loads((rd / "eval.json").read_text())
    ref = json.loads((runs["dirs"][1] / "eval.json").read_text())
    assert abs(ev["bpb"] - ref["bpb"]) < 1e-3, (ev["bpb"], ref["bpb"])
    pk = json.loads((rd / "pack.json").read_text())
    assert pk["code_bytes"] == (work / "train_gpt.py").stat().st_size
    log = (rd / "train_seed2.log").read_text()
    lg = parse_log(log)
    assert abs(lg["val_bpb"] - ev["bpb"]) < 1e-7 and lg["code_bytes"] == pk["code_bytes"]
    assert "final val_loss:" in r.stdout
    # the submission's evaluation does only what the score needs: no plain pass unless asked
    assert "sliding" not in ev and ev["time_s"]["sliding"] is None and "plain pass" not in log
    assert lg["eval_time"] == pytest.approx(ev["time_s"]["total"], abs=1e-3)
    r = subprocess.run(
        [sys.executable, "train_gpt.py", "--help"], cwd=work, env=script_env(), check=False, capture_output=True, text=True
    )
    assert r.returncode == 0 and "--plain-pass" in r.stdout, r.stdout + r.stderr


def test_export_script_text_is_deterministic():
    cfg = preset("record")
    assert export_script(cfg) == export_script(cfg)
