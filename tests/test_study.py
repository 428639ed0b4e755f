"""lmcore.study: Papermill batches (two seeds -> two run folders with executed notebooks;
a failing run recorded and the batch going on; undeclared parameters and files that are
not notebooks refused before anything runs; a finished run moved to a backup before it is
replaced), parameter parsing, paths, seed tables and both significance bars on synthetic
runs (library, command line and the seeds notebook), one-line errors for bad input, the
attention sweep's unavailable backends, a failing sweep run, the notebooks' structure,
and one tiny real run end to end."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from lmcore import plots, study
from lmcore.cli import main
from lmcore.errors import InputError, InputNotFound
from lmcore.stats import challenge_bars, challenge_test
from tests.test_plots import fake_run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _tiny_notebook(path: Path) -> Path:
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    params = new_code_cell('seed = 0\nrun_dir = "unused"\nfail_seed = -1\nlabel = "x"')
    params.metadata["tags"] = ["parameters"]
    work = new_code_cell(
        "import json, pathlib\n"
        "p = pathlib.Path(run_dir)\n"
        "(p / 'out.json').write_text(json.dumps({'seed': seed, 'label': label}))\n"
        "print('seed', seed)"
    )
    boom = new_code_cell("if seed == fail_seed:\n    raise RuntimeError(f'boom at seed {seed}')")
    nb.cells = [params, boom, work]
    nbformat.write(nb, path)
    return path


def test_batch_two_seeds_two_run_folders(tmp_path: Path):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    runs = tmp_path / "runs"
    s = study.run_batch(nb, parameters={"label": "hello"}, seeds=[1, 2], runs_dir=runs, root=tmp_path, log=None)
    assert s["ok"] == ["tiny-s1", "tiny-s2"] and s["failed"] == []
    for seed in (1, 2):
        rd = runs / f"tiny-s{seed}"
        executed = nbformat.read(rd / "notebook.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
        assert json.loads((rd / "out.json").read_text()) == {"seed": seed, "label": "hello"}
        assert not (rd / "FAILED.json").exists()
    summary = json.loads(Path(s["summary_path"]).read_text())
    assert summary["ok"] == ["tiny-s1", "tiny-s2"] and summary["parameters"] == {"label": "hello"}


def test_batch_failure_is_recorded_and_the_batch_goes_on(tmp_path: Path, capsys):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    runs = tmp_path / "runs"
    rc = main(["study", "run", str(nb), "-p", "fail_seed", "2", "-p", "label", "lab", "--seeds", "2", "3",
               "--runs-dir", str(runs), "--quiet"])
    assert rc == 1
    failed = json.loads((runs / "tiny-s2" / "FAILED.json").read_text())
    assert "boom at seed 2" in failed["error"] and failed["seed"] == 2
    assert (runs / "tiny-s2" / "notebook.ipynb").is_file()  # the partly executed notebook is kept
    assert json.loads((runs / "tiny-s3" / "out.json").read_text())["seed"] == 3
    assert not (runs / "tiny-s3" / "FAILED.json").exists()
    batches = list((runs / "batches").glob("tiny-*.json"))
    assert len(batches) == 1
    summary = json.loads(batches[0].read_text())
    assert summary["ok"] == ["tiny-s3"] and summary["failed"] == ["tiny-s2"]
    assert "failed" in capsys.readouterr().out


def test_batch_out_dir_and_no_seeds(tmp_path: Path):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    s = study.run_batch(nb, runs_dir=tmp_path / "runs", out_dir=tmp_path / "executed", name="one",
                        root=tmp_path, log=None)
    assert s["ok"] == ["one"]
    assert (tmp_path / "executed" / "one.ipynb").is_file()
    assert json.loads((tmp_path / "runs" / "one" / "out.json").read_text())["seed"] == 0


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_batch_refuses_an_undeclared_parameter(tmp_path: Path, capsys):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    runs = tmp_path / "runs"
    rc = main(["study", "run", str(nb), "-p", "lable", "x", "-p", "label", "y", "--runs-dir", str(runs), "--quiet"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "lable" in line and str(nb) in line
    assert "seed, run_dir, fail_seed, label" in line  # the declared parameters
    assert not runs.exists()  # refused before anything ran or was written
    with pytest.raises(InputError, match="unknown parameter.*lable"):
        study.run_batch(nb, parameters={"lable": "x"}, runs_dir=runs, root=tmp_path, log=None)
    assert not runs.exists()


@pytest.mark.parametrize("content", [b"hello\n", b"\xff\xfe", b"[1, 2]", b"{}"],
                         ids=["text", "binary", "list", "empty"])
def test_batch_refuses_a_file_that_is_not_a_notebook(tmp_path: Path, capsys, content: bytes):
    bad = tmp_path / "x.ipynb"
    bad.write_bytes(content)
    runs = tmp_path / "runs"
    rc = main(["study", "run", str(bad), "--runs-dir", str(runs), "--quiet"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"not a Jupyter notebook: {bad}" in line
    assert not runs.exists()


def test_batch_missing_notebook_is_one_line(tmp_path: Path, capsys):
    with pytest.raises(InputNotFound):
        study.run_batch(tmp_path / "nope.ipynb", runs_dir=tmp_path / "runs", root=tmp_path, log=None)
    rc = main(["study", "run", str(tmp_path / "nope.ipynb"), "--runs-dir", str(tmp_path / "runs")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"notebook not found: {tmp_path / 'nope.ipynb'}" in line
    assert not (tmp_path / "runs").exists()


def _backups(run_dir: Path) -> list[Path]:
    return sorted(d for d in run_dir.iterdir() if d.is_dir() and re.fullmatch(r"replaced-\d{8}-\d{6}(-\d+)?", d.name))


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}


def test_batch_into_a_finished_run_backs_it_up_first(tmp_path: Path):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    runs = tmp_path / "runs"
    rd = fake_run(runs / "tiny", seed=5, bpb=2.0)
    (rd / "notebook.ipynb").write_text("{}")
    old = _files(rd)
    lines: list[str] = []
    # a failing run: FAILED.json beside the backup, no old result left in place
    s = study.run_batch(nb, parameters={"fail_seed": 0}, runs_dir=runs, root=tmp_path, log=lines.append)
    assert s["failed"] == ["tiny"]
    [b1] = _backups(rd)
    assert _files(b1) == old
    assert set(_files(rd)) == {"FAILED.json", "notebook.ipynb", "notebook.log"}
    assert "boom at seed 0" in json.loads((rd / "FAILED.json").read_text())["error"]
    said = [ln for ln in lines if "earlier run" in ln]
    assert len(said) == 1 and str(rd) in said[0] and "val_bpb 2.0000" in said[0] and str(b1) in said[0]
    assert lines.index(said[0]) < next(i for i, ln in enumerate(lines) if ln.startswith("[1/1] tiny: started"))
    # backups are not runs
    assert plots.find_runs(runs) == [rd]
    assert list(study.seeds_table([str(runs / "t*")], root=tmp_path)["run"]) == ["tiny"]
    with pytest.raises(InputNotFound):
        study.expand_runs([str(rd / "*")], root=tmp_path)
    # a successful run: the new results beside both backups
    failed_files = _files(rd)
    s = study.run_batch(nb, runs_dir=runs, root=tmp_path, log=None)
    assert s["ok"] == ["tiny"]
    b1_again, b2 = _backups(rd)
    assert b1_again == b1 and _files(b2) == failed_files
    assert set(_files(rd)) == {"notebook.ipynb", "notebook.log", "out.json"}


def test_batch_out_dir_backs_up_the_executed_notebook(tmp_path: Path):
    nb = _tiny_notebook(tmp_path / "tiny.ipynb")
    runs, outs = tmp_path / "runs", tmp_path / "executed"
    study.run_batch(nb, runs_dir=runs, out_dir=outs, root=tmp_path, log=None)
    first = (outs / "tiny.ipynb").read_bytes()
    study.run_batch(nb, parameters={"fail_seed": 0}, runs_dir=runs, out_dir=outs, root=tmp_path, log=None)
    [b] = _backups(runs / "tiny")
    assert (b / "tiny.ipynb").read_bytes() == first and (b / "out.json").is_file()
    assert not (runs / "tiny" / "out.json").exists() and (runs / "tiny" / "FAILED.json").is_file()


def test_replace_in_the_phase_runners_backs_up_a_finished_run(tmp_path: Path):
    # run_one: a run failing at its config replaces a finished run
    rd = fake_run(tmp_path / "runs" / "one", seed=5, bpb=2.0)
    old = _files(rd)
    lines: list[str] = []
    row = study.run_one(rd, overrides=["model.bigram=trigram"], raise_errors=False, root=REPO, log=lines.append)
    assert row["status"] == "failed" and "model.bigram" in row["error"]
    [b] = _backups(rd)
    assert _files(b) == old
    assert set(_files(rd)) == {"FAILED.json", "study.json"}
    assert any(str(rd) in ln and "val_bpb 2.0000" in ln and str(b) in ln for ln in lines)
    # train_phase, failing in training; the executed notebook is left where Papermill writes it
    rd2 = fake_run(tmp_path / "runs" / "two", seed=6, bpb=2.5)
    (rd2 / "notebook.ipynb").write_text("{}")
    (rd2 / "checkpoints").mkdir()
    (rd2 / "checkpoints" / "step_5.pt").write_bytes(b"x")
    old2 = _files(rd2)
    with pytest.raises(InputError, match="nodata"):
        study.train_phase(rd2, overrides=[f"data.data_dir={tmp_path / 'nodata'}"], progress=False, root=REPO,
                          log=None)
    [b2] = _backups(rd2)
    assert _files(b2) == {k: v for k, v in old2.items() if k != "notebook.ipynb"}
    assert (b2 / "checkpoints" / "step_5.pt").is_file() and not (rd2 / "checkpoints").exists()
    assert {"FAILED.json", "notebook.ipynb"} <= set(_files(rd2))
    assert not {"summary.json", "eval.json", "pack.json"} & set(_files(rd2))
    assert [Path(p) for p in plots.load_runs(tmp_path / "runs")["path"]] == [rd.resolve(), rd2.resolve()]


def test_bad_input_errors_are_one_line(tmp_path: Path, capsys):
    rc = main(["study", "seeds-table", str(tmp_path / "nothing-*")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and repr(str(tmp_path / "nothing-*")) in line
    rc = main(["study", "figures", "--runs-dir", str(tmp_path / "none"), "--out", str(tmp_path / "figs")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(tmp_path / "none") in line and not (tmp_path / "figs").exists()
    fake_run(tmp_path / "runs" / "c-s1", seed=1, loss=5.0)
    rc = main(["study", "seeds-table", str(tmp_path / "runs" / "c-s1"), "--reference-loss", "nan"])
    out, err = capsys.readouterr()
    assert rc == 2 and "nan" in _one_error_line(err) and "c-s1" in out
    with pytest.raises(InputError, match="if_exists='keep'"):
        study.train_phase(tmp_path / "t", if_exists="keep", log=None)
    assert not (tmp_path / "t").exists()
    untrained = tmp_path / "runs" / "empty"
    untrained.mkdir()
    (untrained / "study.json").write_text("{}")
    with pytest.raises(InputError, match="empty.*no val_loss"):
        study.seeds_test(study.seeds_table([untrained]), reference_loss=5.0)


def test_prepare_data_missing_tokenizer(tmp_path: Path):
    from lmcore.data import shard_name, write_shard

    data = tmp_path / "data"
    data.mkdir()
    for split in ("val", "train"):
        write_shard(data / shard_name(split, 0), list(range(100)))
    cfg = study.make_config("smoke", overrides=[f"data.data_dir={data}", f"data.tokenizer={tmp_path / 'tok.model'}"])
    with pytest.raises(InputNotFound, match="tok.model"):
        study.prepare_data(cfg, root=tmp_path, progress=False)


def test_parse_param():
    assert study.parse_param('["train.iterations=5", "eval.ttt=false"]') == ["train.iterations=5", "eval.ttt=false"]
    assert study.parse_param("3") == 3 and study.parse_param("0.5") == 0.5
    assert study.parse_param("true") is True and study.parse_param("null") is None
    assert study.parse_param("smoke") == "smoke" and study.parse_param("runs/x-s1") == "runs/x-s1"


def test_repo_root_and_resolve(tmp_path: Path):
    assert study.repo_root(REPO / "notebooks") == REPO
    assert study.repo_root(REPO / "lmcore") == REPO
    assert study.resolve("runs/x", REPO) == REPO / "runs" / "x"
    assert study.resolve(tmp_path / "abs") == tmp_path / "abs"


def test_no_module_of_the_study_changes_the_working_directory():
    # notebooks run with notebooks/ as the working directory: paths are resolved, never chdir'ed
    for f in (REPO / "lmcore" / "study").glob("*.py"):
        assert "chdir" not in f.read_text(), f


def test_field_variants():
    assert study.field_variants("model.bigram", ["hashed", "none"]) == {
        "hashed": ["model.bigram=hashed"], "none": ["model.bigram=none"]}
    assert study.field_variants("model.gated_attn_layers", [[0, 2]]) == {"0,2": ["model.gated_attn_layers=0,2"]}


def test_seeds_table_and_test(tmp_path: Path):
    runs = tmp_path / "runs"
    for seed, loss in ((1, 5.000), (2, 5.002), (3, 4.999)):
        fake_run(runs / f"cand-s{seed}", "seeds", "candidate", seed, bpb=loss / 1.6, loss=loss)
    for seed, loss in ((1, 5.020), (2, 5.021), (3, 5.019)):
        fake_run(runs / f"ref-s{seed}", "seeds", "reference", seed, bpb=loss / 1.6, loss=loss)
    table = study.seeds_table([str(runs / "cand-s*")], root=tmp_path)
    assert list(table["seed"]) == [1, 2, 3] and list(table["val_loss"]) == [5.000, 5.002, 4.999]
    summ = study.seeds_summary(table).set_index("metric")
    assert summ.loc["val_loss", "n"] == 3 and summ.loc["val_loss", "mean"] == pytest.approx(5.000333333)
    res = study.seeds_test(table, reference_runs=[str(runs / "ref-s*")], root=tmp_path)
    assert res.reference_n == 3 and res.improvement == pytest.approx(0.019666667)
    assert res.passed and res.p_value < 0.01 and "PASSES" in res.statement
    # a published number, in bpb: converted to nats with the runs' bytes/token (4600 / 2000)
    res = study.seeds_test(table, reference_bpb=3.1)
    assert res.reference_n == 1 and res.reference_mean == pytest.approx(3.1 * 0.6931471805599453 * 2.3)
    res = study.seeds_test(table, reference_loss=5.004)
    assert not res.passed and res.improvement < 0.005
    with pytest.raises(InputError, match="reference"):
        study.seeds_test(table)
    with pytest.raises(InputNotFound, match="nothing-"):
        study.seeds_table([str(runs / "nothing-*")], root=tmp_path)
    t = study.welch_table(res)
    assert "p_value" in set(t["what"])


CAND_LOSSES = (5.000, 5.003, 4.999)
REF_LOSSES = (5.004, 5.006, 5.005)  # improvement ~0.0043 nats: the practice bar passes, the README's does not
METRIC = "val_loss (nats/token)"


def _seed_runs(tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    for seed, loss in enumerate(CAND_LOSSES, 1):
        fake_run(runs / f"cand-s{seed}", "seeds", "candidate", seed, bpb=loss / 1.6, loss=loss)
    for seed, loss in enumerate(REF_LOSSES, 1):
        fake_run(runs / f"ref-s{seed}", "seeds", "reference", seed, bpb=loss / 1.6, loss=loss)
    return runs / "cand-s*", runs / "ref-s*"


def test_seeds_bars_states_both_bars(tmp_path: Path):
    cand, ref = _seed_runs(tmp_path)
    table = study.seeds_table([str(cand)])
    bars = study.seeds_bars(table, reference_runs=[str(ref)])
    expected = challenge_bars(CAND_LOSSES, REF_LOSSES, metric=METRIC)
    assert bars == expected
    assert not bars["readme"].passed and bars["practice"].passed
    assert bars["readme"].statement.startswith("README bar (0.005 nats, p < 0.01)")
    assert bars["practice"].statement.startswith("maintainers' frontier bar (p < 0.25")
    t = study.welch_table(bars).set_index("what")
    assert list(t.columns) == ["readme", "practice"]
    for key in ("readme", "practice"):
        for field in ("p_value", "t", "df", "min_improvement", "alpha", "passed"):
            assert t.loc[field, key] == getattr(expected[key], field)
    # seeds_test keeps its meaning: one test, the README's bar by default
    assert study.seeds_test(table, reference_runs=[str(ref)]) == challenge_test(CAND_LOSSES, REF_LOSSES, metric=METRIC)
    # one published number (taken as exact: its std is nan, so compare the statements)
    got, want = study.seeds_bars(table, reference_loss=5.01), challenge_bars(CAND_LOSSES, 5.01, metric=METRIC)
    assert {k: r.statement for k, r in got.items()} == {k: r.statement for k, r in want.items()}


def test_seeds_table_cli(tmp_path: Path, capsys):
    cand, ref = _seed_runs(tmp_path)
    rc = main(["study", "seeds-table", str(cand), "--reference-runs", str(ref)])
    out = capsys.readouterr().out
    assert rc == 0 and "val_loss" in out and "cand-s3" in out
    for bar in challenge_bars(CAND_LOSSES, REF_LOSSES, metric=METRIC).values():
        assert bar.statement in out
    assert "readme" in out and "practice" in out


def test_seeds_notebook_states_both_bars(tmp_path: Path):
    # 05_seeds on existing (synthetic) runs: nothing is trained
    cand, ref = _seed_runs(tmp_path)
    s = study.run_batch(REPO / "notebooks" / "05_seeds.ipynb",
                        parameters={"run_dirs": [str(cand)], "reference_runs": [str(ref)]},
                        runs_dir=tmp_path / "batch", root=REPO, log=None)
    assert s["ok"] == ["05_seeds"], s
    executed = nbformat.read(tmp_path / "batch" / "05_seeds" / "notebook.ipynb", as_version=4)
    last = [c for c in executed.cells if c.cell_type == "code"][-1]
    printed = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    bars = challenge_bars(CAND_LOSSES, REF_LOSSES, metric=METRIC)
    assert printed.splitlines() == [bars["readme"].statement, bars["practice"].statement]
    table = next(o for o in last.outputs if o.output_type == "execute_result")["data"]["text/plain"]
    assert "readme" in table and "practice" in table


def test_attention_sweep_reports_unavailable_backends(tmp_path: Path):
    # on a CPU machine FA3 / FA2 cannot run: recorded with the reason, never trained
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    df = study.attention_sweep(["fa3", "fa2"], runs_dir=tmp_path / "runs", root=REPO, log=None)
    assert list(df["variant"]) == ["fa3", "fa2"]
    assert list(df["status"]) == ["unavailable", "unavailable"]
    assert all(isinstance(e, str) and e for e in df["error"])
    assert not any((tmp_path / "runs" / "attention" / f"{b}-s1337" / "model.pt").exists() for b in ("fa3", "fa2"))


def test_sweep_records_failed_runs_and_goes_on(tmp_path: Path):
    df = study.sweep("bad", {"a": ["model.bigram=trigram"], "b": ["train.nope=1"]}, runs_dir=tmp_path / "runs",
                     root=REPO, log=None)
    assert list(df["status"]) == ["failed", "failed"]
    fa = json.loads((tmp_path / "runs" / "bad" / "a-s1337" / "FAILED.json").read_text())
    assert "model.bigram" in fa["error"] and fa["phase"] == "config/data"
    assert "train.nope" in df.iloc[1]["error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_structure(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cell"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be tagged `parameters`"
    tree = ast.parse(first.source)
    assert tree.body, "empty parameters cell"
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{path.name}: parameters cell may hold only `name = literal` lines: {ast.unparse(stmt)}")
        ast.literal_eval(stmt.value)  # raises on anything but a literal
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{path.name}: outputs must be stripped"
    for c in code[1:]:
        assert "lmcore" in c.source or "study." in c.source or "plots." in c.source, (
            f"{path.name}: every cell calls lmcore: {c.source[:60]!r}")


def test_expected_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_train.ipynb", "02_ablation_attention.ipynb", "03_ablation_bigram.ipynb",
            "04_ablation_gated_attention.ipynb", "05_seeds.ipynb", "06_figures.ipynb", "07_ttt.ipynb",
            "09_ablation_speed.ipynb"} <= names


@pytest.mark.slow
def test_run_one_end_to_end(tmp_path: Path):
    ov = ["train.iterations=3", "train.warmdown_iters=1", "train.val_every=0"]
    row = study.run_one(tmp_path / "runs" / "one", preset="tiny", overrides=ov, seed=3, study="t", variant="v",
                        progress=False, log=None)
    assert row["status"] == "ok" and row["steps"] == 3 and row["seed"] == 3
    assert row["val_bpb"] > 0 and row["total_bytes"] > 0 and row["score_source"].startswith("eval")
    st = json.loads((tmp_path / "runs" / "one" / "study.json").read_text())
    assert st["status"] == "ok" and set(st["phases"]) == {"data", "train", "pack", "eval"}
    table = study.run_table(row)
    assert "artifact bytes" in set(table["what"])
    # run again into the same folder: the earlier run is replaced, its files kept in a backup
    row2 = study.run_one(tmp_path / "runs" / "one", preset="tiny", overrides=ov, seed=4, progress=False, log=None)
    assert row2["status"] == "ok" and row2["seed"] == 4
    [backup] = _backups(tmp_path / "runs" / "one")
    assert plots.load_run(backup)["seed"] == 3 and plots.load_run(backup)["status"] == "ok"


@pytest.mark.slow
def test_multi_process_run_goes_through_torchrun(tmp_path: Path):
    # num_gpus > 1: train and eval run under torchrun (2 CPU ranks with gloo here), pack as a
    # subprocess; their output is streamed to `log` and the run folder is read back
    ov = ["train.iterations=2", "train.warmdown_iters=1", "train.grad_accum=2", "train.val_every=0"]
    lines: list[str] = []
    try:
        row = study.run_one(tmp_path / "mp", preset="tiny", overrides=ov, seed=5, num_gpus=2, log=lines.append)
    finally:
        print("\n".join(lines))
    assert row["status"] == "ok" and row["world_size"] == 2 and row["steps"] == 2
    assert any("torch.distributed.run" in ln and "--nproc_per_node=2" in ln for ln in lines)
    assert any("eval: wrote" in ln for ln in lines)
    assert json.loads((tmp_path / "mp" / "eval.json").read_text())["world_size"] == 2


def test_a_sweep_run_is_a_subprocess_that_records_its_own_failure(tmp_path: Path):
    # the real job command (`lmcore study run-one`): training fails at its start, in the subprocess
    lines: list[str] = []
    df = study.sweep("sub", {"short": ["data.val_max_tokens=16"]}, preset="tiny", runs_dir=tmp_path / "runs",
                     devices=["cpu"], progress=False, root=REPO, log=lines.append)
    rd = tmp_path / "runs" / "sub" / "short-s1337"
    assert list(df["status"]) == ["failed"]
    failed = json.loads((rd / "FAILED.json").read_text())
    assert failed["phase"] == "train" and "val" in failed["error"]  # written by the run itself, kept by the pool
    log = (rd / "run.log").read_text()
    assert "-m lmcore study run-one --run-dir" in log.splitlines()[0] and "lmcore study: error:" in log
    assert any("sub/short-s1337: FAILED after" in ln for ln in lines)
