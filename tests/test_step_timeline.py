"""benchmarks/step_timeline.py: the gap attribution on a made-up Chrome trace (which step a device
event belongs to by its launch, host gaps against device gaps, NCCL time, the tail), and the
script's steps on CPU (the steady rows and the report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_timeline  # noqa: E402


def _kernel(name: str, ts: float, dur: float, corr: int) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts: float, dur: float, corr: int) -> dict:
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _trace() -> list[dict]:
    mark = step_timeline.STEP_MARK
    return [
        {"cat": "user_annotation", "name": f"{mark}1", "ts": 0.0, "dur": 100.0},
        {"cat": "user_annotation", "name": f"{mark}2", "ts": 100.0, "dur": 100.0},
        _launch(10, 5, 1), _launch(12, 5, 2), _launch(90, 5, 3), _launch(110, 2, 4),
        _kernel("gemm_a", 20, 30, 1),  # 20-50
        _kernel("gemm_b", 55, 5, 2),  # 5 us after a: launch turnaround
        _kernel("attn_c", 96, 14, 3),  # 36 us after b; launched at 95: 35 us waiting for the host
        _kernel("ncclDevKernel_AllReduce", 150, 20, 4),  # step 2, launched at 112 long before
        {"cat": "cpu_op", "name": "aten::item", "ts": 58.0, "dur": 40.0},  # over c's gap
        {"cat": "cpu_op", "name": "aten::tiny", "ts": 60.0, "dur": 2.0},
    ]


def test_gaps_are_split_by_when_the_next_kernel_was_launched():
    one, two = step_timeline.analyze(_trace())
    assert one["step"] == "1" and two["step"] == "2"
    # step 1 runs from its first kernel (20) to step 2's first (150)
    assert one["span_ms"] == pytest.approx(0.130)
    assert one["busy_ms"] == pytest.approx(0.049)
    assert one["short_gap_ms"] == pytest.approx(0.005)
    assert one["host_gap_ms"] == pytest.approx(0.035) and one["device_gap_ms"] == pytest.approx(0.001)
    assert one["tail_ms"] == pytest.approx(0.040)
    assert one["nccl_ms"] == 0
    (gap,) = one["gaps"]
    assert gap["us"] == 36.0 and gap["host_us"] == 35.0 and gap["after"] == "gemm_b" and gap["before"] == "attn_c"
    assert gap["host_calls"] == ["aten::item (0.04 ms)"]
    # the last step ends with its last kernel
    assert two["span_ms"] == pytest.approx(0.020) and two["busy_ms"] == pytest.approx(0.020)
    assert two["nccl_ms"] == pytest.approx(0.020) and two["gaps"] == [] and two["tail_ms"] == 0


def test_a_step_without_device_events_is_left_out():
    events = [e for e in _trace() if e.get("args", {}).get("correlation") != 4]
    assert [r["step"] for r in step_timeline.analyze(events)] == ["1"]


def test_the_script_runs_its_steps_on_cpu_and_reports(tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--steps", "3", "--profile", "1",
            "--skip", "1", "--log-every", "2"]
    assert step_timeline.main(argv) == 0
    info = json.loads((out / "timeline_rank0.json").read_text())
    assert info["rank"] == 0 and info["world_size"] == 1 and info["card"] == "cpu"
    assert [r["step"] for r in info["steady"]] == [2, 3, 4]
    assert all(r["gpu_ms"] >= r["enqueue_ms"] > 0 for r in info["steady"])
    assert info["profiled"] == []  # no device events on a CPU
    assert (out / "timeline.md").read_text().count("\n| 0 | ") == 3
    assert "| 0 | 4 |" in capsys.readouterr().out
