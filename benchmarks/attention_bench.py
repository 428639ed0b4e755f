"""Time causal attention forward+backward for every available lmcore attention backend.

Default shape is the record's: B=48, T=2048, 8 query heads and 4 KV heads of 64, bf16.
Each backend is first checked against the float32 math reference on a small batch, then
timed with CUDA events (warm-up, then the median of N fwd+bwd runs). Prints a table with
the time, the ratio to sdpa_flash (FlashAttention-2 through SDPA) and the card's name.
On a machine without CUDA it says so and exits 0.

usage: python benchmarks/attention_bench.py [--batch 48] [--seq 2048] [--heads 8]
       [--kv-heads 4] [--head-dim 64] [--warmup 10] [--iters 50] [--backends a,b,...]
       [--compile]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore.attention import AVAILABLE, CUDA_BACKENDS, attention, available_backends, math_attention


def _inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, generator=g)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _max_err(H: int, Hkv: int, D: int, dtype: torch.dtype, fn) -> float:
    q, k, v = _inputs(2, 512, H, Hkv, D, dtype, seed=1)
    with torch.no_grad():
        y = fn(q, k, v)
        ref = math_attention(q, k, v)
    return (y.float() - ref.float()).abs().max().item()


def _time_fwd_bwd(fn, q, k, v, warmup: int, iters: int) -> float:
    grad = torch.randn_like(q)

    def step() -> None:
        y = fn(q, k, v)
        torch.autograd.grad(y, (q, k, v), grad)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--backends", default="", help="comma-separated subset (default: all available)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) versions")
    a = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("attention_bench: CUDA is needed (torch.cuda.is_available() is False); nothing to time.")
        return 0

    dtype = torch.bfloat16
    card = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    print(f"card: {card} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(
        f"shape: B={a.batch} T={a.seq} H={a.heads} Hkv={a.kv_heads} D={a.head_dim} bf16, fwd+bwd, "
        f"median of {a.iters} after {a.warmup} warm-up"
    )
    av = available_backends("cuda", dtype=dtype)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip()] or list(CUDA_BACKENDS) + ["sdpa"]
    for b in wanted:
        if av.get(b) != AVAILABLE:
            print(f"  skip {b}: {av.get(b, 'unknown backend')}")
    runs: list[tuple[str, object]] = []
    for b in wanted:
        if av.get(b) == AVAILABLE:
            runs.append((b, lambda q, k, v, b=b: attention(q, k, v, b)))
            if a.compile:
                runs.append((f"{b}+compile", torch.compile(lambda q, k, v, b=b: attention(q, k, v, b), fullgraph=True)))

    q, k, v = _inputs(a.batch, a.seq, a.heads, a.kv_heads, a.head_dim, dtype)
    results: dict[str, tuple[float, float]] = {}
    for name, fn in runs:
        try:
            err = _max_err(a.heads, a.kv_heads, a.head_dim, dtype, fn)
            ms = _time_fwd_bwd(fn, q, k, v, a.warmup, a.iters)
        except Exception as e:  # noqa: BLE001 - report any failure and go on with the others
            print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        results[name] = (ms, err)

    base = results.get("sdpa_flash", (float("nan"), 0.0))[0]
    print()
    print(f"{'backend':<22}{'ms':>9}{'vs sdpa_flash':>15}{'max|err| vs math':>19}  card")
    for name, (ms, err) in results.items():
        ratio = base / ms if not math.isnan(base) else float("nan")
        print(f"{name:<22}{ms:>9.3f}{ratio:>14.2f}x{err:>19.2e}  {card}")
    print("(ratio = sdpa_flash time / backend time: >1 is faster than sdpa_flash)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
