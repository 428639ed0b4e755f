"""lmcore.plots on synthetic run folders: loading into pandas, tables, and every figure
written as non-empty PNG and SVG files (or skipped with a reason when no run has data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from lmcore import plots
from lmcore.config import preset


def fake_run(
    d: Path,
    study: str | None = "bigram",
    variant: str | None = "hashed",
    seed: int = 1,
    bpb: float = 2.0,
    loss: float | None = None,
    backend: str = "sdpa",
    tokens_per_s: float = 1000.0,
    pack: bool = True,
    evaluate: bool = True,
    chunks: int = 4,
    overrides: tuple[str, ...] = (),
) -> Path:
    """A run folder with the files train / pack / eval / the study layer write."""
    d.mkdir(parents=True, exist_ok=True)
    loss = bpb * 1.6 if loss is None else loss
    cfg = preset("smoke", [*overrides, f"train.seed={seed}"])
    cfg.save(d / "config.json")
    lines = [{"kind": "val", "step": 0, "weights": "raw", "val_loss": 7.0, "val_bpb": 4.0}]
    for s in range(1, 11):
        lines.append({"kind": "train", "step": s, "train_loss": 7.0 - 0.2 * s + 0.01 * seed, "lr_mul": 1.0,
                      "tokens": 4096 * s, "elapsed_ms": 100.0 * s, "step_ms": 100.0, "tokens_per_s": tokens_per_s})
    lines.append({"kind": "event", "step": 8, "event": "late_qat", "lr_mul": 0.1})
    lines.append({"kind": "val", "step": 10, "weights": "raw", "val_loss": loss + 0.01, "val_bpb": bpb + 0.01})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {
        "run_dir": str(d), "preset": "smoke", "completed": True, "stopped_by": "iterations", "steps": 10,
        "tokens": 40960, "wall_time_s": 2.0, "train_time_s": 1.0, "tokens_per_s": tokens_per_s,
        "mean_step_ms": 100.0, "peak_memory_mib": None, "peak_rss_mib": 500.0, "val_loss_raw": loss + 0.01,
        "val_bpb_raw": bpb + 0.01, "val_loss_ema": None, "val_bpb_ema": None, "val_loss": loss + 0.01,
        "val_bpb": bpb + 0.01, "ema": "off", "qat_step": 8, "attention_backend": backend, "world_size": 1,
        "grad_accum_per_rank": 1, "seed": seed, "device": "cpu", "card": "cpu", "compiled": False,
        "git_commit": "abc", "torch_version": "2.13.0",
    }
    (d / "summary.json").write_text(json.dumps(summary))
    if pack:
        (d / "pack.json").write_text(json.dumps({
            "model_bytes": 250_000 + seed, "code_bytes": 60_000, "total_bytes": 310_000 + seed, "fits": True,
            "limit_bytes": 16_000_000, "timings_s": {"total": 3.0},
        }))
    if evaluate:
        base = [bpb + 0.01 * (i % 3) for i in range(chunks)]
        ttt = [b - 0.002 * i for i, b in enumerate(base)]
        (d / "eval.json").write_text(json.dumps({
            "loss": loss, "bpb": bpb, "tokens": 2000, "bytes": 4600, "chunks": chunks,
            "sliding": {"bpb": bpb + 0.003, "loss": loss + 0.005, "chunk_bpb": base},
            "ttt": {"bpb": bpb, "loss": loss, "chunk_bpb": ttt},
            "ttt_gain_bpb": 0.003, "chunk_gain_bpb": [b - t for b, t in zip(base, ttt)],
            "time_s": {"total": 1.5},
        }))
    if study is not None:
        (d / "study.json").write_text(json.dumps({
            "study": study, "variant": variant, "preset": "smoke", "overrides": list(overrides), "seed": seed,
            "num_gpus": 1, "status": "ok",
        }))
    return d


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for kind, bpb in (("hashed", 2.10), ("product_key", 2.00), ("none", 2.30)):
        for seed in (1, 2):
            fake_run(root / "bigram" / f"{kind}-s{seed}", "bigram", kind, seed, bpb + 0.01 * seed,
                     overrides=(f"model.bigram={kind}",))
    fake_run(root / "attention" / "sdpa-s1", "attention", "sdpa", 1, 2.0, backend="sdpa", tokens_per_s=900.0)
    fake_run(root / "attention" / "fa3-s1", "attention", "fa3", 1, 2.0, backend="fa3", tokens_per_s=5000.0)
    un = root / "attention" / "fa2-s1"
    un.mkdir(parents=True)
    (un / "study.json").write_text(json.dumps({"study": "attention", "variant": "fa2", "seed": 1,
                                               "status": "unavailable", "reason": "needs CUDA"}))
    fake_run(root / "train-only", None, None, 7, 3.0, pack=False, evaluate=False)
    failed = root / "broken"
    failed.mkdir()
    (failed / "FAILED.json").write_text(json.dumps({"phase": "train", "error": "RuntimeError: boom"}))
    (root / "batches").mkdir()
    (root / "batches" / "x.json").write_text("{}")  # not a run
    (root / "bigram" / "hashed-s1" / "checkpoints").mkdir()
    (root / "bigram" / "hashed-s1" / "checkpoints" / "config.json").write_text("{}")  # not a run either
    return root


def test_load_runs(runs_dir: Path):
    df = plots.load_runs(runs_dir)
    assert len(df) == 11
    by = df.set_index("run")
    assert set(by.index) >= {"bigram/hashed-s1", "attention/fa2-s1", "train-only", "broken"}
    r = by.loc["bigram/product_key-s2"]
    assert (r["study"], r["variant"], r["seed"], r["bigram"]) == ("bigram", "product_key", 2, "product_key")
    assert r["val_bpb"] == pytest.approx(2.02) and r["score_source"].startswith("eval")
    assert r["prequant_val_bpb"] == pytest.approx(2.03) and r["status"] == "ok"
    assert r["total_bytes"] == 310_002 and r["ttt_gain_bpb"] == pytest.approx(0.003)
    t = by.loc["train-only"]
    assert t["status"] == "trained" and t["val_bpb"] == pytest.approx(3.01)
    assert t["score_source"].startswith("train") and t["seed"] == 7
    assert by.loc["broken", "status"] == "failed" and "boom" in by.loc["broken", "error"]
    u = by.loc["attention/fa2-s1"]
    assert u["status"] == "unavailable" and u["error"] == "needs CUDA" and pd.isna(u["val_bpb"])


def test_load_runs_empty(tmp_path: Path):
    df = plots.load_runs(tmp_path / "missing")
    assert df.empty and "val_bpb" in df.columns


def test_aggregate_and_comparison(runs_dir: Path):
    df = plots.load_runs(runs_dir)
    bigram = df[df["study"] == "bigram"]
    agg = plots.aggregate(bigram, by="variant").set_index("variant")
    assert agg.loc["product_key", "n"] == 2
    assert agg.loc["product_key", "val_bpb_mean"] == pytest.approx(2.015)
    assert agg.loc["product_key", "val_bpb_std"] == pytest.approx(math.sqrt(0.00005))
    table = plots.comparison_table(bigram)
    assert list(table.columns[:3]) == ["variant", "seed", "status"] and len(table) == 6


def test_metrics_and_chunk_gains(runs_dir: Path):
    m = plots.load_metrics(runs_dir / "bigram" / "none-s1")
    assert list(m["step"]) == list(range(1, 11)) and "train_loss" in m
    assert len(plots.load_metrics(runs_dir / "bigram" / "none-s1", kind="val")) == 2
    g = plots.chunk_gains(runs_dir / "bigram" / "none-s1")
    assert g == pytest.approx([0.0, 0.002, 0.004, 0.006])
    assert plots.chunk_gains(runs_dir / "train-only") is None


def test_export_figures_writes_png_and_svg(runs_dir: Path, tmp_path: Path):
    out = tmp_path / "figures"
    res = plots.export_figures(runs_dir, out, log=None)
    assert set(res) == set(plots.FIGURES)
    for name, paths in res.items():
        assert not isinstance(paths, str), f"{name}: {paths}"
        assert sorted(p.suffix for p in paths) == [".png", ".svg"]
        for p in paths:
            assert p.is_file() and p.stat().st_size > 1000, p
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in paths[1].read_bytes()[:2000]
    assert not list(out.glob(".*"))  # no temporary files left


def test_export_figures_skips_without_data(tmp_path: Path):
    logged: list[str] = []
    res = plots.export_figures(tmp_path / "nothing", tmp_path / "figures", log=logged.append)
    assert all(isinstance(v, str) and v.startswith("skipped") for v in res.values())
    assert len(logged) == len(plots.FIGURES)
    assert not (tmp_path / "figures").exists() or not list((tmp_path / "figures").iterdir())


def test_partial_data_skips_only_what_is_missing(tmp_path: Path):
    fake_run(tmp_path / "runs" / "a", None, None, 1, 2.0, pack=False, evaluate=False)
    res = plots.export_figures(tmp_path / "runs", tmp_path / "figures", log=None)
    assert isinstance(res["artifact_size"], str) and "pack.json" in res["artifact_size"]
    assert isinstance(res["ttt_gain_per_chunk"], str) and "eval.json" in res["ttt_gain_per_chunk"]
    assert not isinstance(res["loss_curves"], str) and not isinstance(res["throughput_by_backend"], str)


def test_find_runs_skips_backups_of_replaced_runs(runs_dir: Path):
    backup = runs_dir / "bigram" / "hashed-s1" / "replaced-20261128-101010"
    fake_run(backup, "bigram", "hashed", 1, 9.0)
    fake_run(runs_dir / "bigram" / "hashed-s1" / "replaced-20261128-101010-2", "bigram", "hashed", 1, 9.0)
    assert plots.is_backup(backup) and not plots.is_backup(runs_dir / "bigram" / "hashed-s1")
    df = plots.load_runs(runs_dir)
    assert len(df) == 11 and 9.0 not in set(df["val_bpb"])


def test_artifact_size_figure_takes_sizes_and_fits_from_pack_json(tmp_path: Path):
    from lmcore.pack import SIZE_LIMIT

    runs = tmp_path / "runs"
    sizes = {"small": (15_000_000, 900_000, True), "big": (15_990_000, 10_500, False)}
    for name, (model, code, fits) in sizes.items():
        d = fake_run(runs / name, None, None)
        (d / "pack.json").write_text(json.dumps({"model_bytes": model, "code_bytes": code,
                                                 "total_bytes": model + code, "fits": fits}))
    df = plots.load_runs(runs)
    assert list(df["fits"]) == [False, True] and list(df["total_bytes"]) == [16_000_500, 15_900_000]
    ax = plots.plot_artifact_size(df).axes[0]
    ends = sorted(round(p.get_x() + p.get_width()) for p in ax.patches)
    assert ends == sorted([15_000_000, 15_900_000, 15_990_000, 16_000_500])  # model bars, then model + code
    texts = [t.get_text() for t in ax.texts]
    assert any("16,000,500" in t and "DOES NOT FIT" in t for t in texts)
    assert any("15,900,000" in t and "(fits)" in t for t in texts)
    assert [ln.get_xdata()[0] for ln in ax.lines] == [SIZE_LIMIT]
