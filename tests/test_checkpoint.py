"""Tests of lmcore.checkpoint on CPU with a tiny GPT: RNG capture through a file, the
in-memory snapshot that undoes the compile warm-up, checkpoint files (round trip, the
unreadable-checkpoint fallback), metrics truncation and the run-folder rules."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from lmcore.checkpoint import (
    RESUMABLE_FIELDS,
    MemorySnapshot,
    TrainState,
    load_resumable_checkpoint,
    open_run_dir,
    prepare_run_dir,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from lmcore.config import SMOKE, ConfigError
from lmcore.ema import EMA
from lmcore.errors import InputError, InputNotFound
from lmcore.model import GPT
from lmcore.optim import build_optimizers
from lmcore.runs import read_jsonl
from tests.conftest import tiny_model_cfg

CPU = torch.device("cpu")
CFG = replace(SMOKE, model=tiny_model_cfg())


class Loader:
    """A stand-in for DistributedTokenLoader: a position and its state dict."""

    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG.model)
    return model, build_optimizers(model, CFG.train), Loader()


def train_steps(model, opt, loader, n: int) -> None:
    x = torch.randint(0, CFG.model.vocab_size, (2, 8))
    for _ in range(n):
        model(x, x.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()
        loader.pos += 1


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    torch.save(rng_state(CPU), tmp_path / "rng.pt")
    first = draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), CPU)
    assert draws() == first


def test_memory_snapshot_undoes_training_steps():
    model, opt, loader = parts()
    train_steps(model, opt, loader, 1)  # optimizer states exist
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = json.dumps(opt.state_dict(), default=lambda t: t.tolist())
    snap = MemorySnapshot(model=model, opt=opt, loader=loader, device=CPU)
    expected = draws()
    train_steps(model, opt, loader, 2)
    assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())
    snap.restore()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert json.dumps(opt.state_dict(), default=lambda t: t.tolist()) == opt_state
    assert loader.pos == 1 and draws() == expected


def test_checkpoint_round_trip_and_unreadable_fallback(tmp_path):
    model, opt, loader = parts()
    ema = EMA(model, 0.9, "bias_corrected")
    train_steps(model, opt, loader, 3)
    ema.update()
    st = TrainState(step=3, train_ms=1234.5, qat_on=True, qat_step=2, qat_warning="early")
    kw = dict(model=model, opt=opt, ema=ema, loader=loader, cfg=CFG, world_size=1, device=CPU)
    save_checkpoint(tmp_path, st, **kw)
    path5 = save_checkpoint(tmp_path, replace(st, step=5), **kw)
    assert path5.name == "step_000005.pt" and not list(tmp_path.glob("**/*.tmp"))
    path5.write_bytes(path5.read_bytes()[:500])  # truncated
    path, ckpt, notes = load_resumable_checkpoint(tmp_path)
    assert path.name == "step_000003.pt" and len(notes) == 1 and "step_000005.pt: unreadable checkpoint" in notes[0]
    fresh, fresh_opt, fresh_loader = parts(seed=1)
    restored = restore_checkpoint(ckpt, model=fresh, opt=fresh_opt, loader=fresh_loader)
    assert restored == st and fresh_loader.pos == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())
    assert ckpt["ema"]["steps"] == 1 and ckpt["config"]["model"]["model_dim"] == CFG.model.model_dim
    for p in (tmp_path / "checkpoints").glob("*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(InputError, match="no readable checkpoint") as e:
        load_resumable_checkpoint(tmp_path)
    assert "step_000003.pt" in str(e.value) and "step_000005.pt" in str(e.value)


def test_truncate_metrics_keeps_what_the_resumed_session_does_not_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in range(1, 7)]
    rows += [{"kind": "val", "step": s} for s in (0, 3, 6)] + [{"kind": "event", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(path, 3)
    kept = [(r["kind"], r["step"]) for r in read_jsonl(path)]
    assert kept == [("train", 1), ("train", 2), ("train", 3), ("val", 0)]
    truncate_metrics(tmp_path / "missing.jsonl", 3)  # nothing to truncate: no error, no file
    assert not (tmp_path / "missing.jsonl").exists()


def test_run_folder_rules(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputNotFound, match="nothing to resume.*does not exist"):
        prepare_run_dir(run, CFG, resume=True)
    prepare_run_dir(run, CFG, resume=False)  # a fresh run into a new folder: fine, nothing written
    assert not run.exists()
    (run / "metrics.jsonl").parent.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    open_run_dir(run, CFG, resuming=False)  # a fresh run drops old metrics, writes config.json
    assert not (run / "metrics.jsonl").exists() and (run / "config.json").is_file()
    model, opt, loader = parts()
    save_checkpoint(run, TrainState(step=1), model=model, opt=opt, ema=None, loader=loader, cfg=CFG, world_size=1,
                    device=CPU)
    with pytest.raises(InputError, match="already holds a run"):
        prepare_run_dir(run, CFG, resume=False)
    prepare_run_dir(run, CFG.override(["train.iterations=999"]), resume=True)  # a resumable field
    assert "train.iterations" in RESUMABLE_FIELDS
    with pytest.raises(ConfigError, match=r"train\.matrix_lr \(0\.") as e:
        prepare_run_dir(run, CFG.override(["train.matrix_lr=0.5"]), resume=True)
    assert "only train.iterations" in str(e.value)
