"""Tests of lmcore.train and lmcore.smoke_data on CPU: the smoke run from a fresh folder
(val loss below the unigram entropy), bit-exact resume, DDP under torchrun (gloo) against
one process, the run folder's files, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmcore import cli
from lmcore.config import preset
from lmcore.data import DistributedTokenLoader, list_shards, read_shard
from lmcore.runs import read_jsonl
from lmcore.runtime import DistInfo
from lmcore.session import Session, StepRows
from lmcore.train import EMA, latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per
    process slow these CPU runs down 10x or more whenever another process competes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke_run(one_thread, tmp_path_factory):
    """`lmcore train --preset smoke --run-dir runs/a` in an empty folder (builds the data)."""
    work = tmp_path_factory.mktemp("fresh_clone")
    old = os.getcwd()
    os.chdir(work)
    try:
        t = time.perf_counter()
        rc = cli.main(["train", "--preset", "smoke", "--run-dir", "runs/a", "--no-progress", "--compare-ema"])
        seconds = time.perf_counter() - t
    finally:
        os.chdir(old)
    return {"work": work, "rc": rc, "seconds": seconds, "run": work / "runs" / "a", "data": work / "data" / "smoke"}


def _overrides(smoke_run, *extra):
    d = smoke_run["data"]
    return [f"data.data_dir={d}", f"data.tokenizer={d / 'tokenizer.model'}", *extra]


def _unigram_entropy(data_dir: Path) -> float:
    toks = np.concatenate([np.asarray(read_shard(f)) for f in list_shards(data_dir, "fineweb_train_*.bin")])
    counts = np.bincount(toks.astype(np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_smoke_cli_run_beats_unigram_entropy(smoke_run):
    assert smoke_run["rc"] == 0
    run = smoke_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    h = _unigram_entropy(smoke_run["data"])
    print(
        f"smoke run: {smoke_run['seconds']:.1f}s, val loss {summary['val_loss']:.4f} "
        f"(raw {summary['val_loss_raw']:.4f}, ema {summary['val_loss_ema']:.4f}), unigram entropy {h:.4f}"
    )
    assert summary["completed"] and summary["steps"] == 200 and summary["stopped_by"] == "iterations"
    assert summary["val_loss"] < h
    assert summary["val_loss_raw"] < h - 1.0  # the raw weights are far below
    assert summary["val_loss"] == summary["val_loss_ema"]  # the smoke preset keeps its (bias-corrected) EMA
    # SPEC 7: the seed's EMA drags in the initial weights; the bias-corrected one does not
    assert summary["ema"] == "bias_corrected" and summary["ema_alt"] == "original"
    assert summary["val_loss_ema"] < summary["val_loss_ema_alt"]
    print(f"smoke EMA original-mode val loss {summary['val_loss_ema_alt']:.4f}")
    for key in (
        "tokens",
        "wall_time_s",
        "train_time_s",
        "tokens_per_s",
        "mean_step_ms",
        "val_bpb",
        "git_commit",
        "card",
        "attention_backend",
        "world_size",
        "seed",
        "torch_version",
        "peak_rss_mib",
    ):
        assert key in summary
    assert summary["tokens"] == 200 * 4096 and summary["card"] == "cpu" and summary["world_size"] == 1
    # run folder: config, metrics, final model, final checkpoint
    assert json.loads((run / "config.json").read_text())["name"] == "smoke"
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"step", "train_loss", "lr_mul", "tokens", "elapsed_ms", "step_ms", "tokens_per_s"} <= set(train_rows[0])
    assert train_rows[-1]["step"] == 200 and train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    vals = [r for r in rows if r["kind"] == "val"]
    assert [(r["step"], r["weights"]) for r in vals] == [
        (0, "raw"),
        (50, "raw"),
        (100, "raw"),
        (150, "raw"),
        (200, "raw"),
        (200, "ema_original"),
        (200, "ema"),
    ]
    # record and every preset train without fake quantization, as the original effectively does
    assert not any(r["kind"] == "event" and r["event"] == "late_qat" for r in rows)
    assert summary["qat_step"] is None and summary["qat_warning"] is None
    assert summary["attention_requested"] == "auto" and summary["attention_backend"] == "sdpa"
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["config"]["name"] == "smoke" and "tok_emb.weight" in saved["model"]
    assert latest_checkpoint(run).name == "step_000200.pt"
    assert not list(run.glob("**/*.tmp"))


def test_final_val_loss_is_the_one_validation_of_model_pt(smoke_run):
    """Training validates with lmcore.validate.plain_eval, the function evaluation's plain pass
    uses: run on model.pt (the kept EMA weights) it gives summary.json's val_loss, exactly with
    training's batches and to 1e-6 with evaluation's (padded batches of 32)."""
    from lmcore.bpb import ByteTables
    from lmcore.config import Config
    from lmcore.data import load_val_tokens
    from lmcore.evaluate import plain_eval
    from lmcore.model import GPT

    run, d = smoke_run["run"], smoke_run["data"]
    summary = json.loads((run / "summary.json").read_text())
    cfg = Config.load(run / "config.json")
    model = GPT(cfg.model)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    model.set_attention_backend(summary["attention_backend"], torch.device("cpu"))
    seq_len = cfg.data.seq_len
    tokens = load_val_tokens(d, cfg.data.val_pattern, seq_len, cfg.data.val_max_tokens)
    tables = ByteTables.from_sentencepiece(d / "tokenizer.model", cfg.model.vocab_size)
    as_trained = plain_eval(model, tokens, seq_len, tables, "cpu", batch_seqs=65_536 // seq_len, pad=False)
    assert as_trained["loss"] == summary["val_loss"] and as_trained["bpb"] == summary["val_bpb"]
    as_evaluated = plain_eval(model, tokens, seq_len, tables, "cpu")
    assert as_evaluated["loss"] == pytest.approx(summary["val_loss"], abs=1e-6)


def test_training_loop_fits_one_screen():
    """The loop (`_train`) stays readable as one screen: under 150 lines."""
    import inspect

    import lmcore.train as lt

    n = len(inspect.getsource(lt._train).splitlines())
    assert n < 150, f"lmcore.train._train is {n} lines"


def test_smoke_data_is_idempotent(smoke_run):
    from lmcore.smoke_data import ensure_smoke_data

    d = smoke_run["data"]
    info = ensure_smoke_data(d, d / "tokenizer.model", progress=False)
    assert info["built"] is False and info["val_docs"] >= 1 and info["train_tokens"] > 500_000
    assert (d / "tokenizer.model").stat().st_size > 0


def _equal_nested(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _equal_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_is_bit_identical(smoke_run, tmp_path):
    cfg = preset(
        "smoke",
        _overrides(
            smoke_run,
            "train.iterations=24",
            "train.warmdown_iters=12",
            "train.val_every=8",
            "train.log_every=4",
            "train.ema=bias_corrected",
            "train.checkpoint_every=6",
            "train.lmcore_late_qat_threshold=0.15",  # lmcore's own QAT, switched on across the resume
        ),
    )
    full = train(cfg, tmp_path / "full", progress=False, compare_ema=True)
    assert full.completed and full.qat_step is not None and full.qat_step > 14  # QAT after the interruption
    part = train(cfg, tmp_path / "cut", progress=False, max_steps=14)
    assert not part.completed and part.steps == 14 and part.stopped_by == "max_steps"
    assert latest_checkpoint(tmp_path / "cut").name == "step_000014.pt"
    assert not (tmp_path / "cut" / "model.pt").exists()
    rest = train(cfg, tmp_path / "cut", resume=True, progress=False, compare_ema=True)
    assert rest.completed and rest.steps == 24 and rest.qat_step == full.qat_step

    a = torch.load(tmp_path / "full" / "checkpoints" / "step_000024.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "step_000024.pt", weights_only=True)
    for key in ("model", "optimizers", "ema", "loader", "step", "qat"):
        _equal_nested(a[key], b[key], key)
    _equal_nested(
        torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"],
        torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["model"],
        "model.pt",
    )
    assert rest.val_loss == full.val_loss and rest.val_loss_raw == full.val_loss_raw
    assert rest.ema_alt == "original" and rest.val_loss_ema_alt == full.val_loss_ema_alt
    # the metrics of the resumed run hold each step once, as the uninterrupted run's
    key = lambda r: (r["kind"], r["step"], r.get("weights"))
    rows_a = [key(r) for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    rows_b = [key(r) for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert rows_a == rows_b
    losses = lambda p: [r["train_loss"] for r in read_jsonl(p / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")

    # resuming with other settings than iterations / wallclock / log / checkpoint is refused
    other = cfg.override(["train.matrix_lr=0.03"])
    with pytest.raises(ValueError, match="train.matrix_lr"):
        train(other, tmp_path / "cut", resume=True, progress=False)
    # a fresh run into a folder that holds a run is refused
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, tmp_path / "full", progress=False)


def test_warmup_steps_are_undone(smoke_run, tmp_path, monkeypatch):
    """The compile warm-up (CUDA only) must leave no trace: forced on CPU here, QAT graph included."""
    import lmcore.train as lt

    cfg = preset(
        "smoke",
        _overrides(
            smoke_run, "train.iterations=8", "train.warmdown_iters=8", "train.val_every=0",
            "train.lmcore_late_qat_threshold=0.15",
        ),
    )
    plain = train(cfg, tmp_path / "plain", progress=False)
    monkeypatch.setattr(lt, "_compile_warmup_steps", lambda tc, device: 4)
    warm = train(cfg, tmp_path / "warm", progress=False)
    assert plain.qat_step == 7 and warm.qat_step == 7
    a = torch.load(tmp_path / "plain" / "checkpoints" / "step_000008.pt", weights_only=True)
    b = torch.load(tmp_path / "warm" / "checkpoints" / "step_000008.pt", weights_only=True)
    for key in ("model", "optimizers", "ema", "loader"):
        _equal_nested(a[key], b[key], key)


def test_ema_modes():
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema_o, ema_b = EMA(model, 0.9, "original"), EMA(model, 0.9, "bias_corrected")
    with torch.no_grad():
        model.weight.fill_(3.0)
    for e in (ema_o, ema_b):
        e.update()
        e.update()
    # original: 0.81 * 1 + 0.19 * 3; bias corrected: the initial weights carry nothing
    assert torch.allclose(ema_o.weights()["weight"], torch.full((2, 3), 0.81 + 0.19 * 3))
    assert torch.allclose(ema_b.weights()["weight"], torch.full((2, 3), 3.0))
    # each mode's average of the same run can be derived from the other
    assert torch.allclose(ema_o.weights("bias_corrected")["weight"], torch.full((2, 3), 3.0))
    assert torch.allclose(ema_b.weights("original")["weight"], torch.full((2, 3), 0.81 + 0.19 * 3))
    state = ema_b.state_dict()
    fresh = EMA(model, 0.9, "bias_corrected")
    fresh.load_state_dict(state)
    assert fresh.steps == 2 and torch.equal(fresh.weights()["weight"], ema_b.weights()["weight"])
    with pytest.raises(ValueError):
        EMA(model, 0.9, "delayed")


@pytest.mark.parametrize("switch", ["train.foreach_grad_accum", "train.step_batch_copy"])
def test_exact_switches_train_bit_for_bit(smoke_run, tmp_path, switch):
    """Over 4 micro-batches a step, the same weights bit for bit with the switch on as off:
    train.foreach_grad_accum (micro-batch gradients summed by foreach adds, not autograd's
    AccumulateGrad) and train.step_batch_copy (a step's tokens in one copy, not one a micro-batch)."""
    sets = _overrides(smoke_run, "train.iterations=3", "train.warmdown_iters=0", "train.grad_accum=4",
                      "train.log_every=1", "train.val_every=0")
    for on in ("false", "true"):
        r = train(preset("smoke", [*sets, f"{switch}={on}"]), tmp_path / on, progress=False)
        assert r.completed and r.steps == 3
    _equal_nested(torch.load(tmp_path / "false" / "model.pt", weights_only=True)["model"],
                  torch.load(tmp_path / "true" / "model.pt", weights_only=True)["model"], "model.pt")
    losses = lambda p: [r["train_loss"] for r in read_jsonl(p / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses(tmp_path / "true")) == 3 and losses(tmp_path / "true") == losses(tmp_path / "false")


@pytest.mark.parametrize("graphs", [False, True])
def test_foreach_accumulate_keeps_autograds_first_gradient_rule(graphs):
    """A first gradient becomes .grad itself where it has the parameter's strides and is no CUDA
    graph output, else a copy in the parameter's layout; later ones are added; None is skipped."""
    params = (torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(2)))
    host = SimpleNamespace(params=params, cuda_graphs=graphs)
    same, transposed = torch.arange(12.0).view(3, 4), torch.arange(12.0).view(3, 4).t()
    Session._accumulate(host, (same, transposed, None))
    assert (params[0].grad is same) is not graphs and params[0].grad.stride() == (4, 1)
    assert params[1].grad is not transposed and params[1].grad.stride() == (3, 1)
    assert torch.equal(params[1].grad, transposed) and params[2].grad is None
    Session._accumulate(host, (torch.ones(3, 4), torch.ones(4, 3), torch.ones(2)))
    assert torch.equal(params[0].grad, torch.arange(12.0).view(3, 4) + 1)
    assert torch.equal(params[1].grad, transposed + 1) and torch.equal(params[2].grad, torch.ones(2))


def test_foreach_accumulate_groups_what_one_cuda_kernel_takes(monkeypatch):
    """Each foreach add gets lists of one dtype whose pairs share strides (else CUDA adds tensor by
    tensor: session 15's first GPU run of the switch kept all 918 adds a step)."""
    params = [torch.nn.Parameter(torch.zeros(4, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.zeros(5).bfloat16())]
    for p in params:
        p.grad = torch.zeros_like(p)
    calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda a, b: calls.append((a, b)) or real(a, b))
    grads = (torch.ones(4, 3), torch.ones(3, 4).t(), torch.ones(4, 3), torch.ones(5).bfloat16())
    Session._accumulate(SimpleNamespace(params=params, cuda_graphs=False), grads)
    assert sorted(len(a) for a, _ in calls) == [1, 1, 2]
    for a, b in calls:
        assert len({t.dtype for t in a + b}) == 1 and len({(x.stride(), y.stride()) for x, y in zip(a, b)}) == 1
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_torchrun_two_ranks_match_one_process(smoke_run, tmp_path):
    sets = _overrides(
        smoke_run,
        "train.iterations=10",
        "train.warmdown_iters=4",
        "train.log_every=1",
        "train.val_every=0",
        "train.ema=off",
        "train.grad_accum=4",
    )
    args = [x for s in sets for x in ("--set", s)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def train(launcher: list[str], name: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", *launcher, "lmcore", "train", "--preset", "smoke",
               "--run-dir", str(tmp_path / name), "--no-progress", *args, *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)

    # the DDP switches (small buckets, gradients as bucket views) change no number, nor does
    # train.foreach_grad_accum (each rank's first micro-batch summed by it, its last by DDP's hooks),
    # nor train.step_batch_copy (each rank's rows of the step at once; the one process copies x and y a
    # micro-batch)
    ddp = train(["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"], "ddp",
                "--set", "train.ddp_bucket_cap_mb=0.01", "--set", "train.ddp_grad_as_bucket_view=true",
                "--set", "train.foreach_grad_accum=true", "--set", "train.step_batch_copy=true")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = train([], "one", "--set", "train.step_batch_copy=false")
    assert one.returncode == 0, one.stderr[-3000:]
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ddp["world_size"] == 2 and s_ddp["grad_accum_per_rank"] == 2 and s_one["grad_accum_per_rank"] == 4
    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())["train"]
    assert saved["ddp_bucket_cap_mb"] == 0.01 and saved["ddp_grad_as_bucket_view"] is True
    assert saved["foreach_grad_accum"] is True and saved["step_batch_copy"] is True
    curve = lambda p: [(r["step"], r["train_loss"]) for r in read_jsonl(p / "metrics.jsonl") if r["kind"] == "train"]
    a, b = curve(tmp_path / "ddp"), curve(tmp_path / "one")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    for (s, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-3, (s, la, lb)
    assert abs(s_ddp["val_loss"] - s_one["val_loss"]) < 1e-3


def test_bad_input(smoke_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "nope", "--run-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    rc = cli.main(["train", "--preset", "smoke", "--set", "train.nope=1", "--run-dir", str(tmp_path / "x")])
    assert rc == 2 and "train.nope" in capsys.readouterr().err
    rc = cli.main(["train", "--preset", "smoke", "--set", "train.iterations=abc", "--run-dir", str(tmp_path / "x")])
    assert rc == 2 and "train.iterations" in capsys.readouterr().err
    rc = cli.main(["train", "--run-dir", str(tmp_path / "x")])
    assert rc == 2 and "--preset" in capsys.readouterr().err
    rc = cli.main(["train", "--preset", "smoke", "--resume", "--run-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to resume" in err and "checkpoints" in err
    rc = cli.main(["train", "--resume", str(tmp_path / "empty")])
    assert rc == 2 and "nothing to resume" in capsys.readouterr().err
    # grad_accum must split evenly over the processes
    with pytest.raises(ValueError, match="grad_accum"):
        train(preset("smoke", _overrides(smoke_run)), tmp_path / "y", DistInfo(rank=0, world_size=3))
    assert not (tmp_path / "y").exists()


def test_cli_max_steps_then_resume(smoke_run, tmp_path, capsys):
    run = tmp_path / "r"
    sets = [
        x
        for s in _overrides(smoke_run, "train.iterations=6", "train.val_every=0", "train.ema=off")
        for x in ("--set", s)
    ]
    assert (
        cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(run), "--no-progress", "--max-steps", "4"]) == 0
    )
    first = json.loads((run / "summary.json").read_text())
    assert first["completed"] is False and first["steps"] == 4
    # `--resume RUN_DIR` alone: the config comes from the run's config.json
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    done = json.loads((run / "summary.json").read_text())
    assert done["completed"] and done["steps"] == 6 and (run / "model.pt").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()


def test_cli_help_texts():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.choices["train"]
    for action in p._actions:
        if action.dest != "help":
            assert action.help, action.dest


# ---------------------------------------------------------------------------- QAT as the original runs


def _count_fake_quant(monkeypatch) -> list[int]:
    import lmcore.layers as lm  # CastedLinear.cast_weight looks it up there

    calls = [0]
    real = lm.fake_quantize_rows

    def counting(w, bits):
        calls[0] += 1
        return real(w, bits)

    monkeypatch.setattr(lm, "fake_quantize_rows", counting)
    return calls


def test_record_trains_unquantized_at_every_step(smoke_run, tmp_path, monkeypatch):
    """record's train settings with the LR multiplier under 0.15 from step 1 (warmdown 3500, as in
    SPEC 8b): not one forward is fake-quantized. The original's written rule would quantize all."""
    calls = _count_fake_quant(monkeypatch)
    rec = preset("record").train
    cfg = preset(
        "smoke",
        _overrides(
            smoke_run, "train.iterations=12", "train.warmdown_iters=3500", "train.val_every=0", "train.ema=off",
            f"train.lmcore_late_qat_threshold={rec.lmcore_late_qat_threshold}",
        ),
    )
    r = train(cfg, tmp_path / "rec", progress=False)
    assert r.completed and r.steps == 12 and calls[0] == 0 and r.qat_step is None and r.qat_warning is None
    rows = read_jsonl(tmp_path / "rec" / "metrics.jsonl")
    assert all(r["lr_mul"] < 0.15 for r in rows if r["kind"] == "train")  # the old rule's condition held throughout
    assert not [r for r in rows if r.get("event") == "late_qat"]


def test_lmcore_qat_switch_changes_training_and_warns_when_early(smoke_run, tmp_path, monkeypatch, capsys):
    sets = ("train.iterations=12", "train.warmdown_iters=3500", "train.val_every=0", "train.ema=off", "train.log_every=1")
    train(preset("smoke", _overrides(smoke_run, *sets)), tmp_path / "off", progress=False)
    calls = _count_fake_quant(monkeypatch)
    on_cfg = preset("smoke", _overrides(smoke_run, *sets, "train.lmcore_late_qat_threshold=0.15"))
    on = train(on_cfg, tmp_path / "on", progress=True)
    out = capsys.readouterr().out
    assert on.qat_step == 0 and calls[0] > 0
    assert "within the first 10%" in on.qat_warning and "step 0" in on.qat_warning
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["qat_warning"] == on.qat_warning
    assert out.count("warning: lmcore late QAT") == 2  # predicted before the loop, then when it starts
    losses = lambda p: [r["train_loss"] for r in read_jsonl(p / "metrics.jsonl") if r["kind"] == "train"]
    # the first step's loss is equal (zero-initialised output projections); later ones are not
    assert losses(tmp_path / "on")[0] == losses(tmp_path / "off")[0]
    assert losses(tmp_path / "on")[-1] != losses(tmp_path / "off")[-1]
    # started late (step 9 of 12): switched on without a warning
    late = train(on_cfg.override(["train.warmdown_iters=20"]), tmp_path / "late", progress=False)
    assert late.qat_step == 10 and late.qat_warning is None


# ---------------------------------------------------------------------------- never silent


def _cli_sets(smoke_run, *extra) -> list[str]:
    return [x for s in _overrides(smoke_run, *extra) for x in ("--set", s)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_run, tmp_path, monkeypatch, capsys):
    import lmcore.train as lt

    real = lt.lr_multiplier
    monkeypatch.setattr(lt, "lr_multiplier", lambda step, ms, tc: float("inf") if step == 4 else real(step, ms, tc))
    run = tmp_path / "nan"
    sets = _cli_sets(smoke_run, "train.iterations=12", "train.val_every=0", "train.checkpoint_every=3", "train.log_every=100")
    rc = cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "non-finite" in err and "step 000003" not in err and "step_000003.pt" in err
    assert [p.name for p in lt.checkpoints(run)] == ["step_000003.pt"]  # nothing saved after the blow-up
    good = torch.load(run / "checkpoints" / "step_000003.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    assert not (run / "model.pt").exists() and not (run / "summary.json").exists()
    assert [r["event"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "event"] == ["non_finite_loss"]


def test_config_errors_leave_no_run_folder(smoke_run, tmp_path, capsys):
    for bad in ("train.grad_accum=0", "train.batch_tokens=0", "train.iterations=0", "train.matrix_lr=nan"):
        rc = cli.main(["train", "--preset", "smoke", "--set", bad, "--run-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and bad.split("=")[0] in err and len(err.strip().splitlines()) == 1, (bad, err)
        assert not (tmp_path / "x").exists()
    # missing data: named, and still no half-started folder
    rc = cli.main(["train", "--preset", "smoke", "--set", f"data.data_dir={tmp_path / 'nodata'}",
                   "--set", f"data.tokenizer={smoke_run['data'] / 'tokenizer.model'}", "--run-dir", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "nodata" in err and not (tmp_path / "y").exists()


def test_second_job_on_a_run_folder_is_refused(smoke_run, tmp_path, capsys):
    run = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lmcore.runs import RunLock; RunLock(sys.argv[1], 'holder')"
         ".acquire(); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        sets = _cli_sets(smoke_run, "train.iterations=4", "train.val_every=0")
        rc = cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(run), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "in use" in err and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written by the refused job
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the folder is usable again
    assert cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()


def test_resume_skips_an_unreadable_checkpoint(smoke_run, tmp_path, capsys):
    sets = _cli_sets(smoke_run, "train.iterations=9", "train.val_every=0", "train.checkpoint_every=3", "train.ema=off")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(full), "--no-progress"]) == 0
    assert cli.main(["train", "--preset", "smoke", *sets, "--run-dir", str(cut), "--no-progress", "--max-steps", "7"]) == 0
    newest = cut / "checkpoints" / "step_000007.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash of the disk or the copy
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(cut), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "step_000007.pt: unreadable checkpoint" in err and "resuming from step_000006.pt" in err
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert b["completed"] and b["steps"] == 9 and b["val_loss"] == a["val_loss"]  # as if never interrupted
    # no readable checkpoint at all: one line naming the files
    for p in (cut / "checkpoints").glob("*.pt"):
        p.write_bytes(b"garbage")
    rc = cli.main(["train", "--resume", str(cut), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no readable checkpoint" in err and "step_000009.pt" in err and len(err.strip().splitlines()) == 1


def _start_train(smoke_run, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sets = _cli_sets(smoke_run, "train.val_every=0", "train.log_every=1", "train.ema=off", *extra)
    cmd = [sys.executable, "-m", "lmcore", "train", "--preset", "smoke", *sets, "--run-dir", str(run), "--no-progress"]
    # SIGINT back to its default in the child: a shell's background job (`cmd &`, nohup) starts
    # it ignored, and Python then installs no KeyboardInterrupt handler, so Ctrl-C would be lost
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t = time.time()
    while time.time() - t < timeout:
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if any(r["kind"] == "train" and r["step"] >= step for r in rows):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {timeout}s")


def _communicate(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[str, str]:
    """proc's output once it ends; one that does not end in `timeout` s is killed and the test
    fails with what it wrote (a lost signal shows as a failure naming it, not a hang)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running {timeout:.0f} s after the signal; stderr tail:\n{err[-3000:]}") from None


def test_sigterm_checkpoints_and_resumes_ctrl_c_says_one_line(smoke_run, tmp_path):
    import signal

    run = tmp_path / "pre"
    proc = _start_train(smoke_run, run, "train.iterations=100000", "train.checkpoint_every=0")
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = _communicate(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lmcore train: stopped by SIGTERM")
    s = json.loads((run / "summary.json").read_text())
    assert s["stopped_by"] == "sigterm" and not s["completed"] and s["steps"] >= 3
    assert latest_checkpoint(run).name == f"step_{s['steps']:06d}.pt"  # no periodic checkpoint was due
    rc = cli.main(["train", "--resume", str(run), "--set", f"train.iterations={s['steps'] + 2}", "--no-progress"])
    assert rc == 0 and json.loads((run / "summary.json").read_text())["steps"] == s["steps"] + 2

    run2 = tmp_path / "int"
    proc = _start_train(smoke_run, run2, "train.iterations=100000")
    _wait_for_step(run2, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = _communicate(proc)
    assert proc.returncode == 130 and err.strip().splitlines() == ["lmcore train: interrupted"], err


def test_token_ids_past_the_vocabulary_are_named_not_indexed(smoke_run, tmp_path, capsys):
    """A shard with an id >= model.vocab_size: one line naming the shard and the id (it used to die
    in the embedding with an IndexError traceback, a device-side assert on CUDA)."""
    import shutil

    from lmcore.data import write_shard

    bad = tmp_path / "data"
    shutil.copytree(smoke_run["data"], bad)
    shard = sorted(bad.glob("fineweb_train_*.bin"))[-1]
    toks = np.asarray(read_shard(shard)).copy()
    toks[7] = 1024 + 5
    write_shard(shard, toks)
    rc = cli.main(["train", "--preset", "smoke", "--set", f"data.data_dir={bad}",
                   "--set", f"data.tokenizer={bad / 'tokenizer.model'}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and shard.name in err and "1029" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_as_the_default_compile(smoke_run, tmp_path):
    """train.compile_mode=reduce-overhead over 2 micro-batches a step, with and without
    train.foreach_grad_accum: the losses of torch.compile's default mode with the same inductor
    options (the first micro-batch's gradients, CUDA graph outputs, are copied before the second
    adds to them: without that the second raised)."""
    sets = ["train.compile=true", "train.device=cuda", "train.iterations=6", "train.warmdown_iters=0",
            "train.log_every=1", "train.val_every=0", "train.inductor_mix_order_reduction=true"]
    losses = {}
    # the last: train.step_batch_copy's rows from pinned buffers, the graphs' inputs cast from them
    for mode, foreach, copy in (("default", "false", "false"), ("reduce-overhead", "false", "false"),
                                ("reduce-overhead", "true", "false"), ("reduce-overhead", "true", "true")):
        torch._dynamo.reset()
        cfg = preset("smoke", _overrides(smoke_run, *sets, f"train.compile_mode={mode}",
                                         f"train.foreach_grad_accum={foreach}",  # true: copied too
                                         f"train.step_batch_copy={copy}"))
        assert cfg.train.grad_accum == 2
        r = train(cfg, tmp_path / f"{mode}-{foreach}-{copy}", progress=False)
        assert r.completed and r.steps == 6
        rows = read_jsonl(tmp_path / f"{mode}-{foreach}-{copy}" / "metrics.jsonl")
        losses[mode, foreach, copy] = [x["train_loss"] for x in rows if x["kind"] == "train"]
    assert len(losses["default", "false", "false"]) == 6
    for case in (("reduce-overhead", "false", "false"), ("reduce-overhead", "true", "false")):
        assert losses[case] == pytest.approx(losses["default", "false", "false"], rel=1e-4)
    # the same rows: the first step's loss (a forward of the same weights) is equal bit for bit; later
    # ones differ as two runs of one config do on CUDA (session 22: 6.128690 against 6.128684 at step 3)
    with_copy, without = losses["reduce-overhead", "true", "true"], losses["reduce-overhead", "true", "false"]
    assert with_copy[0] == without[0] and with_copy == pytest.approx(without, rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_rows_on_cuda_are_the_loaders_rows(smoke_run):
    """train.step_batch_copy on CUDA: each step's rows, read into two pinned buffers used in turn and
    copied without a wait, are the loader's rows on the device, step after step."""
    d, args = smoke_run["data"], (4 * 64 * 3, 64, 3)
    rows = StepRows(DistributedTokenLoader(d), torch.device("cuda"))
    ref = DistributedTokenLoader(d)
    got = [rows.next(*args) for _ in range(5)]  # held, so a rewritten buffer would show
    want = [torch.from_numpy(ref.next_step(*args)) for _ in range(5)]
    assert [t.device.type for t in got] == ["cuda"] * 5 and got[0].shape == (3, 4 * 64 + 1)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)
    assert all(buf.is_pinned() for buf, _ in rows.host) and len(rows.host) == 2
