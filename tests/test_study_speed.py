"""lmcore.study.speed: the speed table (speedup over a baseline variant, MFU from the config's
FLOPs) and the same-math check (training losses against the baseline at the same seed), on
run folders written here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmcore.config import Config, preset
from lmcore.errors import InputError
from lmcore.flops import count_flops
from lmcore.study import SPEED_LEVERS, loss_difference, loss_differences, speed_table, speed_variants


def test_loss_difference_compares_the_steps_both_logged():
    d = loss_difference({1: 3.0, 2: 2.5, 3: 2.0, 4: 1.0}, {1: 3.0, 2: 2.6, 3: 1.8, 5: 0.0})
    assert d == pytest.approx({"steps": 3, "max_abs_diff": 0.2, "mean_abs_diff": 0.1, "last_step": 3,
                               "last_loss_baseline": 2.0, "last_loss": 1.8})
    assert loss_difference({1: 1.0}, {2: 1.0})["steps"] == 0


def _run(root: Path, variant: str, seed: int, step_ms: float, losses: list[float], world: int = 1) -> dict:
    d = root / f"{variant}-s{seed}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    lines = [{"kind": "train", "step": i + 1, "train_loss": v} for i, v in enumerate(losses)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [*lines, {"kind": "val", "step": 3}]))
    return {"variant": variant, "seed": seed, "status": "ok", "path": str(d), "mean_step_ms": step_ms,
            "tokens_per_s": 2048 * world / (step_ms / 1000), "peak_memory_mib": 100.0, "val_bpb": 2.0,
            "world_size": world}


def test_speed_table_and_loss_differences(tmp_path: Path):
    df = pd.DataFrame([
        _run(tmp_path, "defaults", 1, 100.0, [3.0, 2.0, 1.0]),
        {**_run(tmp_path, "defaults", 2, 110.0, [3.1, 2.1, 1.1]), "status": "trained"},  # train-only runs count
        _run(tmp_path, "fused", 1, 80.0, [3.0, 2.02, 1.03]),
        _run(tmp_path, "fused", 3, 84.0, [9.0, 9.0, 9.0]),  # no baseline run of seed 3: no row
        _run(tmp_path, "two_ranks", 1, 50.0, [3.0, 2.0, 1.0], world=2),
        {"variant": "broken", "seed": 1, "status": "failed", "path": str(tmp_path / "nowhere")},
        {**_run(tmp_path, "cut", 1, 10.0, [3.0]), "status": "incomplete"},  # training did not complete: left out
    ])
    t = speed_table(df, "defaults", peak_tflops=100.0)
    assert list(t["variant"]) == ["defaults", "fused", "two_ranks"] and list(t["runs"]) == [2, 2, 1]  # no broken, cut
    assert t["mean_step_ms"].tolist() == [105.0, 82.0, 50.0]
    assert t["speedup"].tolist() == pytest.approx([1.0, 105 / 82, 105 / 50])
    flops = count_flops(preset("tiny")).train
    # MFU: tokens/s a GPU (2,048 tokens a step a GPU) x FLOPs a token / peak, mean over runs
    assert t.loc[0, "mfu"] == pytest.approx((2048 / 0.1 + 2048 / 0.11) / 2 * flops / 100e12)
    assert t.loc[2, "mfu"] == pytest.approx(2048 / 0.05 * flops / 100e12)
    assert "mfu" not in speed_table(df, "defaults").columns
    ld = loss_differences(df, "defaults")
    assert ld[["variant", "seed", "steps"]].values.tolist() == [["fused", 1, 3], ["two_ranks", 1, 3]]
    assert ld.loc[0, "max_abs_diff"] == pytest.approx(0.03) and ld.loc[0, "mean_abs_diff"] == pytest.approx(0.05 / 3)
    assert ld.loc[0, "last_loss"] == pytest.approx(1.03) and ld.loc[1, "max_abs_diff"] == 0.0
    with pytest.raises(InputError, match="baseline variant 'plain' is not among the runs' variants"):
        speed_table(df, "plain")


def test_speed_levers_are_valid_overrides_and_picked_by_name():
    for name, sets in SPEED_LEVERS.items():  # every lever set makes a valid record config
        assert isinstance(preset("record", sets), Config), name
    v = speed_variants(["defaults", "fused_qk"], {"mine": ["train.ddp_bucket_cap_mb=50"]})
    assert v == {"defaults": [], "fused_qk": ["train.fused_qk_norm_rope=true"], "mine": ["train.ddp_bucket_cap_mb=50"]}
    v["fused_qk"].append("x")  # a copy: SPEED_LEVERS is left as it was
    assert SPEED_LEVERS["fused_qk"] == ["train.fused_qk_norm_rope=true"]
    with pytest.raises(InputError, match=r"unknown speed lever\(s\) \['fast'\]: expected some of \['defaults'"):
        speed_variants(["defaults", "fast"])
