"""What fp8 matmuls could save at `record`'s micro-batch: bf16 against fp8 (e4m3, row-wise scales,
torch._scaled_mm) for each linear layer shape of a block, forward (Y = X W^T), input gradient
(dX = dY W) and weight gradient (dW = dY^T X), with the casts fp8 needs timed apart.

usage: python benchmarks/fp8_matmul_bench.py [--tokens 98304] [--json PATH]

GPU only (sm90). Operands are made once; each GEMM is timed with CUDA events (timed: 10 calls
in a row, median of 20) after 5 warm-ups. "cast" is a compiled bf16 -> fp8 row-wise
quantization of the activation operand (the row max, the scale, the cast; for dW also the
transposed copies _scaled_mm needs: it takes a row-major first operand and a column-major
second). Per step: each shape's calls a
step of `record` (11 layers x 8 micro-batches; c_k and c_v share a shape, as do c_q and proj).
Nothing here trains: it bounds what an fp8 linear layer could save, it does not build one.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

E4M3 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(E4M3).max
# (K in, N out, calls a block) of a record block's linear layers
SHAPES = [(512, 512, 2), (512, 256, 2), (512, 1536, 1), (1536, 512, 1)]
CALLS_PER_STEP = 11 * 8  # layers x micro-batches


def timed(fn, reps: int = 20, inner: int = 10) -> float:
    """ms a call: the median over reps of CUDA-event time for `inner` calls in a row, divided by
    inner (calls back to back, so the host's launch overhead hides behind the GPU's work)."""
    for _ in range(5):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / inner)
    return statistics.median(out)


def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, cols) bf16 -> (fp8 rows, fp32 scale (rows, 1)) with x ~= fp8 * scale."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    return (x.float() * (FP8_MAX / amax)).to(E4M3), amax / FP8_MAX


def shape_row(M: int, K: int, N: int, per_block: int, cast, cast_t) -> dict:
    """One shape's bf16 and fp8 GEMM times, the casts' times and the fp8 forward's relative error."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    xq, xs = cast(x)
    wq, ws = rowwise(w)  # (N, K), a scale per output row
    dyq, dys = cast(dy)
    wtq, wts = rowwise(w.t().contiguous())  # (K, N), a scale per input column
    dytq, dyts = cast_t(dy)  # (N, M)
    xtq, xts = cast_t(x)  # (K, M)
    bf = {"fwd": timed(lambda: x @ w.t()), "dX": timed(lambda: dy @ w), "dW": timed(lambda: dy.t() @ x)}
    f8 = {
        "fwd": timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)),
        "dX": timed(lambda: torch._scaled_mm(dyq, wtq.t(), scale_a=dys, scale_b=wts.t(), out_dtype=torch.bfloat16)),
        "dW": timed(lambda: torch._scaled_mm(dytq, xtq.t(), scale_a=dyts, scale_b=xts.t(), out_dtype=torch.bfloat16)),
    }
    casts = {"x": timed(lambda: cast(x)), "dy": timed(lambda: cast(dy)),
             "xT": timed(lambda: cast_t(x)), "dyT": timed(lambda: cast_t(dy))}
    ref = (x.float() @ w.float().t())
    got = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16).float()
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"K": K, "N": N, "calls_per_step": per_block * CALLS_PER_STEP, "bf16_ms": bf, "fp8_ms": f8,
            "cast_ms": casts, "fwd_rel_err": rel}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48 * 2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    M = args.tokens
    cast = torch.compile(rowwise)
    cast_t = torch.compile(lambda x: rowwise(x.t().contiguous()))  # the transposed copy dW needs
    rows = [shape_row(M, K, N, per_block, cast, cast_t) for K, N, per_block in SHAPES]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {M} tokens a call; ms a call (median of 20)")
    print()
    print("| K -> N | calls/step | bf16 fwd / dX / dW | fp8 fwd / dX / dW | casts x, dY, x^T, dY^T | fwd rel. error |")
    print("|---|---|---|---|---|---|")
    tot = {"bf16": 0.0, "fp8_fwd_dx": 0.0, "fp8_all": 0.0}
    for r in rows:
        b, f, c, n = r["bf16_ms"], r["fp8_ms"], r["cast_ms"], r["calls_per_step"]
        print(f"| {r['K']} -> {r['N']} | {n} | {b['fwd']:.3f} / {b['dX']:.3f} / {b['dW']:.3f} | "
              f"{f['fwd']:.3f} / {f['dX']:.3f} / {f['dW']:.3f} | {c['x']:.3f}, {c['dy']:.3f}, {c['xT']:.3f}, {c['dyT']:.3f} | "
              f"{r['fwd_rel_err']:.4f} |")
        tot["bf16"] += n * (b["fwd"] + b["dX"] + b["dW"])
        tot["fp8_fwd_dx"] += n * (f["fwd"] + f["dX"] + b["dW"] + c["x"] + c["dy"])
        tot["fp8_all"] += n * (f["fwd"] + f["dX"] + f["dW"] + c["x"] + c["dy"] + c["xT"] + c["dyT"])
    print()
    print(f"A step's block GEMMs: bf16 {tot['bf16']:.1f} ms; fp8 forward and dX (dW bf16), casts included "
          f"{tot['fp8_fwd_dx']:.1f} ms; fp8 all three, casts included {tot['fp8_all']:.1f} ms. The casts are upper "
          "bounds: in a compiled model they could fuse into the kernels that make x and dY.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": M,
                       "rows": rows, "per_step_ms": tot}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
