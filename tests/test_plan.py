"""Study plans (lmcore.study.plan, report, figures): the plan checked field by field with
one-line errors, the runs seed-major, a real tiny plan run end to end (folders, plan.json,
evaluations, eval sweep) and continued in a later session from its small files alone, the ablation tables' numbers against the statistics computed by
hand, `lmcore study figures` regenerating exactly the committed figures from a trimmed copy
of the committed runs, the committed tables equal to what `lmcore study report` makes of the
committed runs, and the .gitignore keeping weights out of the GPU run folders."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from lmcore.cli import main
from lmcore.errors import InputError
from lmcore.stats import challenge_test
from lmcore.study.plan import load_plan, plan_runs, read_plan, run_plan
from lmcore.study.report import ablation_table, plan_frame, plan_markdown
from tests.test_plots import fake_run

REPO = Path(__file__).resolve().parents[1]
GPU_RUNS = REPO / "runs" / "gpu"


def _plan(**extra) -> dict:
    d = {
        "study": "t", "preset": "tiny", "seeds": [1, 2],
        "variants": {"record": {"seeds": [1, 2, 3]}, "none": {"overrides": ["model.bigram=none"]}},
        "ablations": {"bigram": {"title": "b", "baseline": "record", "variants": ["none"]}},
    }
    d.update(extra)
    return d


def test_runs_are_seed_major():
    p = read_plan(_plan())
    got = [(v, s, rd.name) for v, s, rd in plan_runs(p, Path("R"))]
    assert got == [("record", 1, "record-s1"), ("none", 1, "none-s1"), ("record", 2, "record-s2"),
                   ("none", 2, "none-s2"), ("record", 3, "record-s3")]
    assert all(rd.parent == Path("R/t") for *_x, rd in plan_runs(p, Path("R")))


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown field 'colour'"),
    ({"variants": {"record": {"overrides": ["model.bigram=nope"]}}}, "variants.record"),
    ({"variants": {"record": {"overrides": ["model.nope=1"]}}}, "variants.record"),
    ({"variants": {"record": {"seeds": []}}}, "variants.record.seeds"),
    ({"ablations": {"x": {"title": "x", "baseline": "record", "variants": ["ghost"]}}}, "'ghost' is not a variant"),
    ({"ablations": {"x": {"title": "x", "runs": "record", "baseline": "a", "columns": {"b": "val_bpb_raw"}}}},
     "ablations.x.baseline"),
    ({"eval": {"overrides": ["train.seed=3"]}}, "train.seed"),
    ({"eval_sweep": {"run": "record-s9", "variants": {}}}, "eval_sweep.run"),
    ({"eval_sweep": {"run": "record-s1", "variants": {"a": ["model.bigram=none"]}}}, "model.bigram"),
    ({"study": "../x"}, "study"),
])
def test_bad_plans_are_refused_naming_the_field(change, message):
    d = _plan()
    d.update(change)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_plan(d, "p.json")


def test_plan_file_errors_are_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    assert main(["study", "plan", str(bad), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tiny_plan_end_to_end(tmp_path: Path):
    plan = _plan(seeds=[1], variants={"record": {"seeds": [1, 2]}, "none": {"overrides": ["model.bigram=none"]}},
                 overrides=["train.ema=bias_corrected", "train.compare_ema=true"],
                 eval={"overrides": ["eval.stride=128"], "ttt": False},
                 eval_sweep={"run": "record-s1", "variants": {"lr": ["eval.ttt_lr=0.01"]}})
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    df = run_plan(f, runs_dir=tmp_path / "runs", log=None)
    assert list(df["run"]) == ["t/record-s1", "t/none-s1", "t/record-s2"]
    assert set(df["status"]) == {"ok"}
    assert json.loads((tmp_path / "runs/t/plan.json").read_text()) == plan
    for rd in df["path"]:
        ev = json.loads((Path(rd) / "eval.json").read_text())
        assert ev["eval_config"]["stride"] == 128 and ev["eval_config"]["ttt"] is False and ev.get("ttt") is None
        summ = json.loads((Path(rd) / "summary.json").read_text())
        assert summ["ema"] == "bias_corrected" and summ["ema_alt"] == "original"
        assert math.isfinite(summ["val_bpb_ema_alt"])
    sweep = json.loads((tmp_path / "runs/t/record-s1/eval-lr.json").read_text())
    assert sweep["eval_config"]["ttt_lr"] == 0.01 and sweep["ttt"]["bpb"] > 0
    assert not (tmp_path / "runs/t/record-s2/eval-lr.json").exists()
    table = ablation_table(load_plan(tmp_path / "runs/t/plan.json"), df, "bigram")
    assert list(table["row"]) == ["record", "none"] and list(table["n"]) == [2, 1]

    # a later session: only the small files are left (as committed); a seed is added; keep runs only it
    for f in [*(tmp_path / "runs").rglob("*.pt"), *(tmp_path / "runs").rglob("*.ptz")]:
        f.unlink()
    before = {rd: json.loads((Path(rd) / "study.json").read_text())["started"] for rd in df["path"]}
    plan["variants"]["none"]["seeds"] = [1, 3]
    f.write_text(json.dumps(plan))
    said: list[str] = []
    df2 = run_plan(f, runs_dir=tmp_path / "runs", if_exists="keep", log=said.append)
    assert list(df2["run"]) == ["t/record-s1", "t/none-s1", "t/record-s2", "t/none-s3"]
    assert set(df2["status"]) == {"ok"}
    assert {rd: json.loads((Path(rd) / "study.json").read_text())["started"] for rd in df["path"]} == before
    assert sum("kept (finished)" in line for line in said) == 3 and any("eval sweep kept" in line for line in said)
    assert not (tmp_path / "runs/t/record-s1/model.int6.ptz").exists()  # nothing of record-s1 was rerun


def _fake_plan_runs(base: Path) -> dict:
    plan = _plan(metric="val_bpb_raw", ablations={
        "bigram": {"title": "b", "baseline": "record", "variants": ["none"], "extra": ["tokens_per_s"]},
        "ema": {"title": "e", "runs": "record", "baseline": "a", "columns": {"a": "val_bpb_raw", "b": "eval_bpb"}},
    })
    (base / "t").mkdir(parents=True)
    (base / "t/plan.json").write_text(json.dumps(plan))
    for v, seeds, bpbs in (("record", [1, 2, 3], [2.00, 2.02, 2.01]), ("none", [1, 2], [2.10, 2.13])):
        for s, b in zip(seeds, bpbs):
            fake_run(base / "t" / f"{v}-s{s}", study="t", variant=v, seed=s, bpb=b - 0.01, tokens_per_s=1000.0 * s)
    return plan


def test_ablation_tables_match_the_statistics(tmp_path: Path):
    _fake_plan_runs(tmp_path)
    plan = load_plan(tmp_path / "t/plan.json")
    df = plan_frame(plan, tmp_path)
    t = ablation_table(plan, df, "bigram").set_index("row")
    rec, none = [2.00, 2.02, 2.01], [2.10, 2.13]  # fake_run's val_bpb_raw is bpb + 0.01
    assert t.loc["record", "n"] == 3 and t.loc["none", "n"] == 2
    assert t.loc["record", "mean"] == pytest.approx(2.01) and t.loc["record", "std"] == pytest.approx(0.01)
    assert t.loc["none", "diff"] == pytest.approx(2.115 - 2.01)
    assert t.loc["none", "p_baseline_better"] == pytest.approx(challenge_test(rec, none, 0.0).p_value)
    assert t.loc["none", "p_row_better"] == pytest.approx(challenge_test(none, rec, 0.0).p_value)
    assert t.loc["none", "p_baseline_better"] < 0.05 < t.loc["none", "p_row_better"]
    assert math.isnan(t.loc["record", "p_baseline_better"])
    assert t.loc["none", "tokens_per_s_mean"] == pytest.approx(1500.0)
    e = ablation_table(plan, df, "ema").set_index("row")
    assert list(e.index) == ["a", "b"] and e.loc["b", "n"] == 3
    evals = [json.loads((tmp_path / f"t/record-s{s}/eval.json").read_text())["bpb"] for s in (1, 2, 3)]
    assert e.loc["b", "mean"] == pytest.approx(sum(evals) / 3)
    md = plan_markdown(plan, tmp_path)
    assert "### bigram: b" in md and "| `none` | 2 | 2.1150 ± 0.0212 | 0.1050 |" in md


def test_report_command(tmp_path: Path, capsys):
    _fake_plan_runs(tmp_path)
    assert main(["study", "report", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == plan_markdown(tmp_path / "t/plan.json", tmp_path)
    assert main(["study", "report", "--runs-dir", str(tmp_path / "t")]) == 2
    assert "no plan.json" in capsys.readouterr().err


needs_gpu_runs = pytest.mark.skipif(not (GPU_RUNS / "plan.json").is_file(), reason="no committed GPU study runs")


@needs_gpu_runs
def test_figures_command_regenerates_the_committed_figures(tmp_path: Path):
    runs = tmp_path / "runs"
    shutil.copytree(GPU_RUNS, runs / "gpu", ignore=shutil.ignore_patterns("notebook.ipynb", "*.log"))
    for extra in ("record-s2025", "record-s7"):  # trimmed: two of record's four seeds
        shutil.rmtree(runs / "gpu" / extra)
    out = tmp_path / "figures"
    assert main(["study", "figures", "--runs-dir", str(runs), "--out", str(out)]) == 0
    committed = {p.name for p in (REPO / "figures").glob("gpu_*")}
    assert committed and {p.name for p in out.iterdir()} == committed
    for name in committed:
        assert (out / name).stat().st_size > 1000


@needs_gpu_runs
def test_committed_tables_are_what_the_runs_give():
    assert (GPU_RUNS / "tables.md").read_text() == plan_markdown(GPU_RUNS / "plan.json", REPO / "runs")


@needs_gpu_runs
def test_gpu_runs_keep_small_files_only():
    sample = [GPU_RUNS / "record-s1337" / n for n in ("model.pt", "model.int6.ptz", "checkpoints/step_500.pt")]
    kept = [GPU_RUNS / "record-s1337" / n for n in ("summary.json", "metrics.jsonl", "pack.json", "eval.json")]
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", *map(str, sample + kept)], cwd=REPO, capture_output=True, text=True,
                         check=False)  # exit 1 when some path is not ignored
    ignored = set(res.stdout.split())
    assert ignored == {str(p) for p in sample}
    tracked = subprocess.run(["git", "ls-files", "runs"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [t for t in tracked if t.endswith((".pt", ".ptz")) or "/checkpoints/" in t or "/smoke/" in t]
