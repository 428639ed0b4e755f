"""The bf16 dense matmul peak of this GPU, measured: the best TFLOP/s of square bf16 matmuls
(fp32 accumulation, as torch does) over a few sizes, 50 timed repetitions each after 10
warm-up ones, timed with CUDA events. The MFU of benchmarks/speed.sh divides by this number,
measured in the same job on the same card.

usage: python benchmarks/matmul_peak.py [--json FILE] [--sizes 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import json

import torch


def tflops(n: int, reps: int = 50, warmup: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    args = ap.parse_args()
    by_size = {n: round(tflops(n), 1) for n in args.sizes}
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "by_size_tflops": by_size,
           "peak_tflops": max(by_size.values())}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
