"""The bf16 dense matmul peak of this GPU, measured: the best TFLOP/s of square bf16 matmuls
(fp32 accumulation, as torch does) over a few sizes, 50 timed repetitions each after 10
warm-up ones, timed with CUDA events. The MFU of benchmarks/speed.sh divides by this number,
measured in the same job on the same card.

That peak is likely a burst: a few seconds of matmuls in all, and in session 16 the card's power
cap was already lowering its clock during them (RESULTS.md). With --sustain SECONDS, 8192-size matmuls also run for that long and
the second half is timed: the rate the card holds at its power limit ("sustained_tflops"; its
clock and power are in speed.sh's clocks.md, stage "peak").

usage: python benchmarks/matmul_peak.py [--json FILE] [--sizes 4096 8192 16384] [--sustain SECONDS]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _operands(n: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a, b and an output c for c = a @ b: n x n bf16."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return a, b, torch.empty(n, n, device=device, dtype=torch.bfloat16)


def tflops(n: int, reps: int = 50, warmup: int = 10) -> float:
    a, b, c = _operands(n)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1000.0) / 1e12


def sustained_tflops(n: int, seconds: float, device: str = "cuda") -> float:
    """TFLOP/s of n-size bf16 matmuls over the second half of `seconds` of them back to back (the
    first half brings the card to its steady clock)."""
    a, b, c = _operands(n, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(duration: float) -> tuple[int, float]:  # matmuls in batches of 10 until `duration` has passed
        count, start = 0, time.perf_counter()
        while True:
            for _ in range(10):
                torch.mm(a, b, out=c)
            sync()
            count += 10
            if time.perf_counter() - start >= duration:
                return count, time.perf_counter() - start

    run(seconds / 2)
    count, took = run(seconds / 2)
    return 2 * n**3 * count / took / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                    help="also 8192-size matmuls for this long, the second half timed (0: not run)")
    args = ap.parse_args()
    by_size = {n: round(tflops(n), 1) for n in args.sizes}
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "by_size_tflops": by_size,
           "peak_tflops": max(by_size.values())}
    if args.sustain > 0:
        out["sustained_tflops"] = round(sustained_tflops(8192, args.sustain), 1)
        out["sustained_seconds"] = args.sustain
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
