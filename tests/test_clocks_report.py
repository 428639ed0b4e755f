"""benchmarks/clocks_report.py: nvidia-smi's samples split by a job log's stage lines, on made-up
samples in nvidia-smi's CSV layout (full field names with units in the header, no units in the
values)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import clocks_report

HEADER = ("timestamp, clocks.current.sm [MHz], clocks.max.sm [MHz], power.draw [W], power.limit [W], "
          "temperature.gpu, utilization.gpu [%], clocks_event_reasons.sw_power_cap\n")


def _sample(t: str, mhz: int, watts: float, util: int, capped: bool) -> str:
    return f"2026/11/29 {t}.250, {mhz}, 1980, {watts}, 700.00, 60, {util}, {'Active' if capped else 'Not Active'}\n"


def test_stages_take_the_busy_samples_between_their_lines(tmp_path: Path):
    log = tmp_path / "job.log"
    log.write_text("23:59:58 == setup: stages peak lm1\n23:59:59 == peak (1 s)\n00:00:02 == lm_solo_1 (GPU 0, 4 s)\n"
                   "00:00:02 == lm_before_1b (GPU 1, 4 s)\n"  # beside GPU 0's run: not a stage of GPU 0's clocks
                   "00:00:03 step 10\n00:00:06 == one GPU: skipped\n00:00:06 == report (8 s)\n00:00:07 == done\n")
    assert clocks_report.stages(log) == [("setup:", 86398, 86399), ("peak", 86399, 86402),
                                         ("lm_solo_1", 86402, 86406), ("report", 86406, 86407)]
    csv = tmp_path / "clocks.csv"
    csv.write_text(HEADER + _sample("23:59:58", 345, 80.0, 0, False)  # setup: idle, not busy
                   + _sample("23:59:59", 1980, 650.0, 100, False) + _sample("00:00:01", 1700, 699.0, 100, True)
                   + _sample("00:00:02", 1200, 300.0, 50, False)  # lm_solo_1 compiling: not busy
                   + _sample("00:00:03", 1600, 700.0, 99, True) + _sample("00:00:04", 1500, 698.0, 98, True)
                   + _sample("00:00:05", 1800, 690.0, 97, False))
    df = clocks_report.samples(csv)
    assert df["t"].tolist() == [86398.25, 86399.25, 86401.25, 86402.25, 86403.25, 86404.25, 86405.25]
    lines = clocks_report.report(df, clocks_report.stages(log), busy=90).splitlines()
    assert lines[2:] == ["| setup: | 1 | 0 | - | - | - | - | - | - |",
                         "| peak | 2 | 2 | 1840 | 1700 | 674 | 700 | 50% | 60 |",
                         "| lm_solo_1 | 4 | 3 | 1600 | 1500 | 698 | 700 | 67% | 60 |",
                         "| report | 0 | 0 | - | - | - | - | - | - |"]
    log.write_text("10:00:00 == lm_after_2 (GPU 0,1, 9 s)\n10:00:05 == lm_v_x_1 (GPU 1, 14 s)\n10:00:07 done\n")
    assert clocks_report.stages(log) == [("lm_after_2", 36000, 36007)]  # 2 ranks: GPU 0's too
    assert clocks_report.stages(log, until=36005.5) == [("lm_after_2", 36000, 36007)]  # the log's end is later


def test_a_job_that_never_ended_keeps_its_last_stage(tmp_path: Path, capsys):
    # the machine lost while GPU 0's last run was going: its stage line is the log's last stamped line, so it would
    # take no time; it runs to the last sample instead (session 44's lm_solo_1, added by hand then)
    log = tmp_path / "job.log"
    log.write_text("10:00:00 == lm_after_1 (GPU 0, 1 s)\n10:00:03 == lm_solo_1 (GPU 0, 4 s)\n")
    assert clocks_report.stages(log) == [("lm_after_1", 36000, 36003)]
    assert clocks_report.stages(log, until=36006.25) == [("lm_after_1", 36000, 36003), ("lm_solo_1", 36003, 36006.25)]
    csv = tmp_path / "clocks.csv"
    csv.write_text(HEADER + "".join(_sample(f"10:00:0{i}", 1600 + 10 * i, 690.0, 100, True) for i in range(7)))
    assert clocks_report.main([str(csv), str(log)]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| lm_after_1 | 3 | 3 | 1610 | 1600 | 690 | 700 | 100% | 60 |",
        "| lm_solo_1 | 4 | 4 | 1645 | 1630 | 690 | 700 | 100% | 60 |"]  # to 10:00:07.25


@pytest.mark.parametrize("job, row", [
    # GPU-a5cf18d8: the machine was lost at lm_solo_1's step 100; clocks.md made here from the files that came back
    ("speed-2026-12-03-h200-s44", "| lm_solo_1 | 552 | 123 | 1650 | 1515 | 694 | 700 | 100% | 59 | 687.9 |"),
    # GPU-4a07a7b0: a whole job, clocks.md as the job printed it
    ("speed-2026-12-03-h200-s45", "| lm_solo_1 | 612 | 216 | 1575 | 1425 | 694 | 700 | 100% | 59 | 688.1 |")])
def test_committed_tables_with_the_energy_counter(capsys, job, row):
    res = ROOT / "benchmarks" / "results" / job
    args = [str(res / "clocks.csv"), str(res / "speed.log"), "--profiles", str(res), "--energy", str(res / "energy.csv")]
    assert clocks_report.main(args) == 0
    out = capsys.readouterr().out
    assert out == (res / "clocks.md").read_text()
    assert row in out.splitlines()


def test_older_drivers_name_and_bad_paths(tmp_path: Path, capsys):
    csv = tmp_path / "clocks.csv"
    csv.write_text(HEADER.replace("clocks_event_reasons", "clocks_throttle_reasons")
                   + _sample("10:00:00", 1500, 700.0, 100, True))
    assert clocks_report.samples(csv)["capped"].tolist() == [True]
    log = tmp_path / "job.log"
    log.write_text("10:00:00 no stage here\n")
    assert clocks_report.main([str(csv), str(log)]) == 2
    assert capsys.readouterr().err.strip() == f"clocks_report: {log}: no stage lines ('HH:MM:SS == NAME')"
    assert clocks_report.main([str(tmp_path / "none.csv"), str(log)]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    log.write_text("10:00:00 == lm_solo_1\n10:00:05 done\n")
    csv.write_text(HEADER.replace("power.draw [W], ", "") + "2026/11/29 10:00:00.250, 1500, 1980, 700.00, 60, 100, Active\n")
    assert clocks_report.main([str(csv), str(log)]) == 2
    assert capsys.readouterr().err.startswith(f"clocks_report: {csv}: no column power.draw (columns: timestamp, ")


@pytest.mark.parametrize("job, row", [
    ("speed-2026-11-29-h200-s16b", "| lm_solo_1 | 331 | 193 | 1680 | 1140 | 693 | 700 | 100% | 59 |"),
    ("speed-2026-11-29-h200-s17", "| orig_fa3_1 | 478 | 69 | 1845 | 1500 | 674 | 700 | 83% | 60 |"),
    ("speed-2026-11-29-h200-s18", "| lm_v_qkv_1 | 386 | 227 | 1650 | 1380 | 693 | 700 | 100% | 59 |"),
    ("speed-2026-11-29-h200x2-s19", "| lm_after_2 | 235 | 35 | 1740 | 1635 | 690 | 700 | 91% | 60 |"),
    # session 20's job hung after its first pair: GPU 0 ran orig_fa3_1, but its stage lines name no GPU
    # (they do since), so the pair's second line, orig_fa2_1's, names GPU 0's samples
    ("speed-2026-11-29-h200x2-s20", "| orig_fa2_1 | 3129 | 60 | 1845 | 1710 | 670 | 700 | 93% | 55 |"),
    ("speed-2026-11-29-h200x2-s21", "| lm_v_repeat_v_1 | 388 | 221 | 1680 | 1365 | 693 | 700 | 100% | 54 |"),
    ("speed-2026-11-29-h200x2-s21b", "| lm_before_2 | 273 | 39 | 1755 | 1680 | 691 | 700 | 87% | 52 |"),
    ("speed-2026-11-30-h200x2-s22", "| lm_solo_2 | 217 | 55 | 1755 | 1320 | 646 | 700 | 55% | 50 |"),
    ("speed-2026-11-30-h200x2-s23", "| lm_solo_2 | 199 | 54 | 1792 | 1350 | 630 | 700 | 57% | 58 |"),
    ("speed-2026-11-30-h200x2-s24", "| lm_v_one_graph_2 | 185 | 37 | 1650 | 1530 | 692 | 700 | 76% | 60 |"),
    ("speed-2026-11-30-h200-s24b", "| lm_solo_1 | 271 | 145 | 1665 | 1245 | 693 | 700 | 99% | 56 |"),
    ("speed-2026-11-30-h200x2-s25", "| lm_after_1 | 446 | 216 | 1650 | 1530 | 693 | 700 | 100% | 58 |"),
    ("speed-2026-11-30-h200x2-s26", "| lm_after_1 | 453 | 217 | 1620 | 1455 | 694 | 700 | 100% | 62 |"),
    ("speed-2026-11-30-h200x2-s26b", "| lm_after_2 | 203 | 30 | 1650 | 1350 | 693 | 700 | 97% | 60 |"),
    ("speed-2026-11-30-h200x2-s29", "| lm_after_1 | 412 | 216 | 1605 | 1560 | 694 | 700 | 100% | 60 |")])
def test_committed_clocks_table_is_what_its_samples_give(capsys, job, row):
    # session 16's second speed.sh job (H200 GPU-44b6d01d), session 17's (GPU-c21df98c, the
    # original sampled too), session 18's (GPU-7baecdac) and session 19's (2-rank stages; GPU 0 is
    # GPU-33858fae), session 20's (GPU 0 is GPU-a1f914b4), session 21's two (GPU 0 is GPU-bebd79c4) and
    # session 22's (GPU 0 is GPU-5a19d858), session 23's (GPU 0 is GPU-1f3810d9) and session 24's two (GPU-1ee68278; s24b GPU-48725ebc), session 25's (GPU-3af83493, made here), session 26's two (GPU-34632a62; s26b GPU-451d3400, as printed):
    # nvidia-smi's samples and the job's log as the device wrote them; clocks.md as the report gives them
    # (s16b's rerun here after zero-length stages were left out; s20's made here; s23's printed by the job
    # with --profiles, as speed.sh runs it since session 22; s20's and s25's made again in session 45, when the
    # last stage of a job that never ended began to run to the last sample: s20's hung pair counts its idle
    # samples, s25's lm_after_2 appears)
    res = ROOT / "benchmarks" / "results" / job
    profiles = ["--profiles", str(res)] if "within each profiled step" in (res / "clocks.md").read_text() else []
    assert clocks_report.main([str(res / "clocks.csv"), str(res / "job.log"), *profiles]) == 0
    out = capsys.readouterr().out
    assert out == (res / "clocks.md").read_text()
    assert row in out.splitlines()


def test_profiled_steps_take_the_samples_within_them(tmp_path: Path, capsys):
    # --profiles RES: each GPU 0 run's profiled step (breakdown.json's unix_s) against the samples taken
    # within it; a run on GPU 1 (not sampled) and a profile without unix_s (before session 22) are left out
    log = tmp_path / "job.log"
    log.write_text("10:00:00 == lm_after_1 (GPU 0, 1 s)\n10:00:00 == lm_solo_1 (GPU 1, 1 s)\n"
                   "10:00:10 == lm_before_1 (GPU 0, 11 s)\n10:00:20 == report (21 s)\n")
    csv = tmp_path / "clocks.csv"
    csv.write_text(HEADER + "".join(_sample(f"10:00:0{i}", 1650 + 10 * i, 690.0, 100, True) for i in range(8)))
    t0 = 1_795_910_400.0 + 10 * 3600  # 2026/11/29 10:00:00 UTC
    for run, unix in (("lm_after_1", [t0 + 3.0, t0 + 4.5]), ("lm_solo_1", [t0 + 3.0, t0 + 4.0])):
        (tmp_path / run / "profile").mkdir(parents=True)
        (tmp_path / run / "profile" / "breakdown.json").write_text(
            f'{{"step": 5, "wall_ms": 1500.0, "unix_s": [{unix[0]}, {unix[1]}]}}')
    (tmp_path / "lm_before_1" / "profile").mkdir(parents=True)
    (tmp_path / "lm_before_1" / "profile" / "breakdown.json").write_text('{"step": 5, "wall_ms": 600.0}')
    assert clocks_report.main([str(csv), str(log), "--profiles", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    # samples at 10:00:03.25 and 10:00:04.25 lie in [3.0, 4.5]; the stage's 8 busy samples have median 1685
    assert out[-1] == "| lm_after_1 | 5 | 1500.0 | 2 | 1680, 1690 | 690, 690 | 1685 |"
    assert out[-3].startswith("| run | profiled step |")
    assert clocks_report.main([str(csv), str(log)]) == 0
    assert "profiled step" not in capsys.readouterr().out


def test_session_22s_profiled_steps():
    # session 22's job (GPU 0 is GPU-5a19d858): before's profiled step ran at its stage's clock, after's
    # one sample read higher than its stage's median
    res = ROOT / "benchmarks" / "results" / "speed-2026-11-30-h200x2-s22"
    df, spans = clocks_report.samples(res / "clocks.csv"), clocks_report.stages(res / "job.log")
    rows = clocks_report.profile_report(df, spans, res, busy=90).splitlines()
    assert "| lm_before_1 | 195 | 600.4 | 1 | 1710 | 690 | 1710 |" in rows
    assert "| lm_after_1 | 195 | 529.0 | 1 | 1755 | 679 | 1650 |" in rows
    assert not any(r.startswith("| lm_solo_1 ") for r in rows)  # GPU 1: not sampled


def test_the_energy_counter_gives_each_stages_mean_power_while_busy(tmp_path: Path, capsys):
    # --energy CSV (energy_sample.py's samples): each interval between two counter readings counts where its
    # middle's nearest nvidia-smi sample is busy; the stage's watts are those intervals' joules over their seconds
    import energy_sample

    log = tmp_path / "job.log"
    log.write_text("10:00:00 == lm_after_1 (GPU 0, 1 s)\n10:00:06 == report (7 s)\n10:00:08 done\n")
    csv = tmp_path / "clocks.csv"
    csv.write_text(HEADER + _sample("10:00:00", 1200, 300.0, 40, False)  # compiling: not busy
                   + "".join(_sample(f"10:00:0{i}", 1600, 690.0, 100, True) for i in range(1, 6)))
    readings = [0, 300_000, 990_000, 1_680_000, 2_380_000, 3_060_000, 3_750_000, 3_760_000]  # mJ, one a second
    en = tmp_path / "energy.csv"
    en.write_text(energy_sample.HEADER + "\n" + "".join(
        f"2026/11/29 10:00:0{i}.000, {mj}\n" for i, mj in enumerate(readings)))
    assert clocks_report.main([str(csv), str(log), "--energy", str(en)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| temp C | counter W (busy) |") and lines[1] == "|---" * 10 + "|"
    # lm_after_1 holds the readings at 00 to 05 s: five intervals, their middles at 00.5 (nearest the sample at
    # 00.25, compiling: left out, 300 W) and 01.5 to 04.5 (nearest busy samples: 690, 690, 700 and 680 W)
    w = clocks_report.counter_watts(clocks_report.samples(csv), clocks_report.energy_samples(en), 36000, 36006, 90)
    assert w == 690.0
    assert lines[2] == "| lm_after_1 | 6 | 5 | 1600 | 1600 | 690 | 700 | 100% | 60 | 690.0 |"
    assert lines[3].startswith("| report |") and lines[3].endswith("| - |")
    en.write_text("time, mj\n1, 2\n")
    assert clocks_report.main([str(csv), str(log), "--energy", str(en)]) == 2
    assert "expected the columns timestamp, energy_mj" in capsys.readouterr().err
    assert energy_sample.stamp(0.0).count(":") == 2 and len(energy_sample.stamp(0.0)) == len("2026/11/29 10:00:00.500")
