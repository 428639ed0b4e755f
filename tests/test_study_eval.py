"""Eval-only variants of one packed model (lmcore.study.run.eval_phase, sweeps.eval_sweep): the
packed model is reused (training and packing never called, the artifact's sha256 and the
training files unchanged), one eval-NAME.json per variant with its settings, non-eval fields
refused before anything runs, an earlier variant kept in a backup, a failing variant recorded
while the others finish; run_one's per-phase reuse; the eval table and its figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmcore import plots, study
from lmcore.errors import InputError
from lmcore.runs import sha256_file

REPO = Path(__file__).resolve().parents[1]
TRAINED = ("config.json", "metrics.jsonl", "summary.json", "model.pt", "model.int6.ptz", "pack.json")


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory) -> Path:
    """One tiny run, trained, packed and evaluated (in this process: the tests' working
    directory is the repository root)."""
    rd = tmp_path_factory.mktemp("evalonly") / "run"
    row = study.run_one(rd, preset="tiny", overrides=["train.iterations=4", "train.val_every=0"], seed=7,
                        progress=False, root=REPO, log=None)
    assert row["status"] == "ok"
    return rd


@pytest.fixture
def run(packed_run: Path, tmp_path: Path) -> Path:
    """A private copy of the packed run."""
    return Path(shutil.copytree(packed_run, tmp_path / "run"))


def _snapshot(rd: Path) -> dict[str, tuple[str, int]]:
    return {f: (sha256_file(rd / f), (rd / f).stat().st_mtime_ns) for f in TRAINED}


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an eval-only variant must not train or pack")

    import lmcore.pack
    import lmcore.train

    monkeypatch.setattr(lmcore.train, "train", boom)
    monkeypatch.setattr(lmcore.pack, "pack_run", boom)


def test_eval_phase_variant_reuses_the_packed_model(run: Path, monkeypatch):
    _no_training(monkeypatch)
    before = _snapshot(run)
    eval_json = (run / "eval.json").read_bytes()
    res = study.eval_phase(run, overrides=["eval.ttt_lr=0.01", "eval.ttt_epochs=2"], name="lr01", progress=False,
                           root=REPO, log=None)
    assert _snapshot(run) == before and (run / "eval.json").read_bytes() == eval_json
    written = json.loads((run / "eval-lr01.json").read_text())
    assert written["bpb"] == res["bpb"] > 0
    assert written["eval_config"]["ttt_lr"] == 0.01 and written["eval_config"]["ttt_epochs"] == 2
    st = json.loads((run / "study.json").read_text())
    assert st["status"] == "ok" and st["evals"]["lr01"]["overrides"] == ["eval.ttt_lr=0.01", "eval.ttt_epochs=2"]
    # evaluated again: the earlier file goes to a backup, nothing is overwritten
    study.eval_phase(run, overrides=["eval.ttt_lr=0.02"], name="lr01", progress=False, root=REPO, log=None)
    [backup] = [d for d in run.iterdir() if d.is_dir() and plots.is_backup(d)]
    assert json.loads((backup / "eval-lr01.json").read_text())["eval_config"]["ttt_lr"] == 0.01
    assert json.loads((run / "eval-lr01.json").read_text())["eval_config"]["ttt_lr"] == 0.02


@pytest.mark.parametrize("bad, field", [("train.iterations=5", "train.iterations"), ("quant.calib_seqs=3", "quant"),
                                        ("model.bigram=none", "model.bigram"), ("eval.ttt_lr=-1", "ttt_lr"),
                                        ("eval.nope=1", "eval.nope")])
def test_eval_only_refuses_what_is_not_an_eval_setting(run: Path, bad: str, field: str):
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(InputError, match=field):
        study.eval_phase(run, overrides=[bad], name="x", root=REPO, log=None)
    with pytest.raises(InputError, match=field):
        study.eval_sweep(run, {"ok": ["eval.ttt_lr=0.01"], "bad": [bad]}, devices=["cpu"], root=REPO, log=None)
    assert sorted(p.name for p in run.iterdir()) == before  # refused before anything ran or was written
    with pytest.raises(InputError, match="name"):
        study.eval_phase(run, name="a/b", root=REPO, log=None)


def test_eval_sweep_writes_one_file_per_variant_and_never_trains(run: Path):
    before = _snapshot(run)
    lines: list[str] = []
    variants = {"lr-0.01": ["eval.ttt_lr=0.01"], "ep-2": ["eval.ttt_epochs=2"], "broken": ["eval.stride=4096"]}
    table = study.eval_sweep(run, variants, devices=["cpu"], progress=False, root=REPO, log=lines.append)
    assert _snapshot(run) == before  # the artifact (sha256) and the training files are untouched
    # only `lmcore eval` ran, once per variant
    started = [ln for ln in lines if ": started on " in ln]
    assert len(started) == 3
    for name in variants:
        log = (run / f"eval-{name}.log").read_text()
        assert "-m lmcore eval" in log.splitlines()[0] and f"--output eval-{name}.json" in log.splitlines()[0]
        assert "lmcore train" not in log and "lmcore pack" not in log
    ok = {"lr-0.01": ("ttt_lr", 0.01), "ep-2": ("ttt_epochs", 2)}
    for name, (key, value) in ok.items():
        assert json.loads((run / f"eval-{name}.json").read_text())["eval_config"][key] == value
    # the failing variant is recorded, the others finished
    assert not (run / "eval-broken.json").exists()
    failed = json.loads((run / "FAILED-eval-broken.json").read_text())
    assert failed["phase"] == "eval" and failed["variant"] == "broken" and failed["error"]
    assert not (run / "FAILED.json").exists() and plots.load_run(run)["status"] == "ok"
    by = table.set_index("variant")
    assert set(by.index) == {"run", "lr-0.01", "ep-2", "broken"}
    assert by.loc["broken", "status"] == "failed" and by.loc["lr-0.01", "status"] == "ok"
    assert by.loc["lr-0.01", "eval.ttt_lr"] == 0.01 and by.loc["ep-2", "eval.ttt_epochs"] == 2
    assert by.loc["lr-0.01", "overrides"] == "eval.ttt_lr=0.01"
    # the figure: one panel per field changed alone
    fig = plots.plot_eval_sweep(table)
    assert sorted(ax.get_title() for ax in fig.axes) == ["eval.ttt_epochs", "eval.ttt_lr"]
    # reuse: the same settings are not evaluated again
    lines.clear()
    study.eval_sweep(run, {"lr-0.01": ["eval.ttt_lr=0.01"]}, if_exists="reuse", devices=["cpu"], root=REPO,
                     log=lines.append)
    assert any("reusing" in ln for ln in lines) and not any("started" in ln for ln in lines)


def test_run_one_reuse_reruns_only_the_phase_whose_settings_changed(run: Path, monkeypatch):
    _no_training(monkeypatch)
    before = _snapshot(run)
    ov = ["train.iterations=4", "train.val_every=0"]
    lines: list[str] = []
    row = study.run_one(run, preset="tiny", overrides=[*ov, "eval.ttt_lr=0.01"], seed=7, if_exists="reuse",
                        progress=False, root=REPO, log=lines.append)
    assert row["status"] == "ok" and _snapshot(run) == before  # neither retrained nor repacked
    assert any("train: reusing" in ln for ln in lines) and any("pack: reusing" in ln for ln in lines)
    assert json.loads((run / "eval.json").read_text())["eval_config"]["ttt_lr"] == 0.01
    lines.clear()
    study.run_one(run, preset="tiny", overrides=[*ov, "eval.ttt_lr=0.01"], seed=7, if_exists="reuse",
                  progress=False, root=REPO, log=lines.append)
    assert any("eval: reusing" in ln for ln in lines)
