"""GPU 0's board energy counter (NVML, millijoules since the driver loaded), sampled every --interval seconds into
a CSV until the process is stopped (SIGTERM or SIGINT), for benchmarks/speed.sh beside nvidia-smi's clocks.csv.

nvidia-smi's power.draw is one reading at each sample (on H100-class boards it is said to see about a quarter of
the time); the counter's difference between two samples is the energy of the whole interval, so each interval's
mean power is exact. benchmarks/clocks_report.py --energy turns the samples into each stage's power while busy
(the median over its busy intervals). Timestamps are written as nvidia-smi writes them (local time, "%Y/%m/%d %H:%M:%S.%f"), so the two files join.
Without pynvml the file gets its header only and a line on stderr says why.

    python benchmarks/energy_sample.py OUT_CSV [--interval 0.5]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime

HEADER = "timestamp, energy_mj"


def stamp(t: float) -> str:
    """nvidia-smi's timestamp layout, in local time, to the millisecond."""
    return datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_csv")
    ap.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args(argv)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    with open(args.out_csv, "w") as f:
        print(HEADER, file=f, flush=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # no pynvml, no driver: the header alone, and why
            print(f"energy_sample: no energy counter ({e})", file=sys.stderr)
            return 0
        while not stop:
            print(f"{stamp(time.time())}, {pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)}", file=f, flush=True)
            time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
