"""benchmarks/speed_report.py's arithmetic on a synthetic results folder: step ms from the
original's log and lmcore's summary, tokens/s per GPU, MFU against the measured peak with
lmcore.flops' FLOPs per token, the ratios to the original with FA3 and FA2, and the
same-math check's noise and difference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmcore.config import preset
from lmcore.flops import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed_report  # noqa: E402


def _lm(d: Path, ms: float, losses: list[float]) -> None:
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"mean_step_ms": ms, "attention_backend": "fa3"}))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": i + 1, "train_loss": v, "step_ms": ms + i}) + "\n"
        for i, v in enumerate(losses)))


def test_speed_rows_and_same_math(tmp_path: Path, capsys):
    (tmp_path / "peak.json").write_text(json.dumps({"peak_tflops": 800.0, "card": "H200"}))
    (tmp_path / "orig_fa3_1.log").write_text("step:40/40 train_loss:3.0 train_time:25000ms step_avg:625.00ms\n")
    (tmp_path / "orig_fa2_1.log").write_text("step:40/40 train_loss:3.0 train_time:30000ms step_avg:750.00ms\n")
    _lm(tmp_path / "lm_before_1", 500.0, [3.0, 2.0, 1.5])
    _lm(tmp_path / "math_before_a", 500.0, [3.0, 2.0, 1.5])
    _lm(tmp_path / "math_before_b", 500.0, [3.0, 2.01, 1.5])
    _lm(tmp_path / "math_after", 500.0, [3.0, 2.0, 1.53])
    flops = count_flops(preset("record")).train
    rows = {(r["run"], r["ranks"]): r for r in speed_report.speed_rows(tmp_path, flops, 800.0)}
    lm = rows[("lmcore before", 1)]
    assert lm["vs_fa3"] == pytest.approx(1.25) and lm["vs_fa2"] == pytest.approx(1.5)
    assert lm["tokens_per_s"] == pytest.approx(786_432 / 0.5)
    assert lm["mfu"] == pytest.approx(786_432 / 0.5 * flops / 800e12)
    assert lm["median_ms"] == pytest.approx(501.5)  # steps 2 and 3 (step 1 left out): 501 and 502 ms
    assert rows[("original, real FA3", 1)]["vs_fa3"] == pytest.approx(1.0)
    assert rows[("lmcore after", 1)]["step_ms"] is None
    assert speed_report.main(tmp_path) == 0
    out = capsys.readouterr().out
    assert "max |before - before again| = 0.0100" in out and "max |before - after| = 0.0300" in out
