"""Time causal attention forward and forward+backward for every available lmcore backend.

Default shape is the record's micro-batch: B=48, T=2048, 8 query heads and 4 KV heads of
64, bf16. Each backend is first checked at that very shape against the float32 math
reference (`lmcore.attention.math_reference`): max |err| and the relative error
||x - ref|| / ||ref|| of the output and of dq, dk, dv. Then it is timed with CUDA events
(warm-up, then the median of N runs, launched back to back). Where the installed FA3 build
has PackGQA kernels, "fa3+packgqa" (flash_attn_func(..., pack_gqa=True)) is timed too, and
with FA3 always "fa3+expandkv": k and v repeated to the query heads before the call (plain MHA
kernels, dk/dv summed over each group by autograd), the copies and sums counted.
Prints the card, the FA3 build, and a table; --json writes the same numbers; --profile
also lists each backend's GPU kernels and their time in one fwd+bwd (torch.profiler).
On a machine without CUDA it says so and exits 0.

usage: python benchmarks/attention_bench.py [--batch 48] [--seq 2048] [--heads 8]
       [--kv-heads 4] [--head-dim 64] [--warmup 10] [--iters 50] [--backends a,b,...]
       [--compile] [--json PATH] [--profile]
Run it under `timeout` where a kernel may hang (a fresh FA3 build).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore.attention import AVAILABLE, CUDA_BACKENDS, attention, available_backends, math_reference
from lmcore.layers import repeat_heads

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, generator=g)
    dout = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def errors(fn: Fn, q, k, v, dout, ref) -> dict[str, float]:
    """max |err| and relative norm error of out, dq, dk, dv against `ref` (math_reference)."""
    y = fn(q, k, v)
    got = (y.detach(), *torch.autograd.grad(y, (q, k, v), dout))
    res: dict[str, float] = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        d = a.float() - b
        res[f"max_{name}"] = d.abs().max().item()
        res[f"rel_{name}"] = (d.norm() / b.norm()).item()
    return res


def median_ms(step: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def time_fwd_bwd(fn: Fn, q, k, v, dout, warmup: int, iters: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians."""

    def fwd() -> None:
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd() -> None:
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    return median_ms(fwd, warmup, iters), median_ms(fwd_bwd, warmup, iters)


def kernel_times(fn: Fn, q, k, v, dout, iters: int = 5) -> list[tuple[str, float]]:
    """(kernel name, ms per fwd+bwd) of the GPU kernels one fwd+bwd launches, longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((e.key, us / iters / 1000))
    return sorted(rows, key=lambda r: -r[1])


def fa3_build() -> tuple[str, bool]:
    """(description of the installed FA3 build, whether it has PackGQA kernels)."""
    try:
        version = metadata.version("flash_attn_3")
    except metadata.PackageNotFoundError:
        version = "?"
    mod = importlib.import_module("flash_attn_interface")
    try:
        flags = importlib.import_module("flash_attn_config").CONFIG["build_flags"]
        packgqa = not flags.get("FLASHATTENTION_DISABLE_PACKGQA", True)
    except (ImportError, AttributeError, KeyError):
        packgqa = False
    return f"flash_attn_3 {version} ({Path(mod.__file__).parent})", packgqa


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
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--profile", action="store_true", help="also list each backend's kernels and their times")
    a = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("attention_bench: CUDA is needed (torch.cuda.is_available() is False); nothing to time.")
        return 0

    dtype = torch.bfloat16
    card = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    print(f"card: {card} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    shape = f"B={a.batch} T={a.seq} H={a.heads} Hkv={a.kv_heads} D={a.head_dim} bf16 causal"
    print(f"shape: {shape}; median of {a.iters} after {a.warmup} warm-up")
    av = available_backends("cuda", dtype=dtype)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip()] or list(CUDA_BACKENDS) + ["sdpa"]
    fa3_desc = ""
    runs: list[tuple[str, Fn]] = []
    for b in wanted:
        if av.get(b) != AVAILABLE:
            print(f"  skip {b}: {av.get(b, 'unknown backend')}")
            continue
        runs.append((b, lambda q, k, v, b=b: attention(q, k, v, b)))
        if b == "fa3":
            fa3_desc, packgqa = fa3_build()
            print(f"  fa3 build: {fa3_desc}{', has PackGQA kernels' if packgqa else ''}")
            if packgqa:
                fa3_func = importlib.import_module("flash_attn_interface").flash_attn_func
                runs.append(("fa3+packgqa", lambda q, k, v, f=fa3_func: f(q, k, v, causal=True, pack_gqa=True)))
            runs.append(("fa3+expandkv", lambda q, k, v: attention(  # train.expand_kv's repeat, eager
                q, repeat_heads(k, q.shape[2] // k.shape[2]), repeat_heads(v, q.shape[2] // v.shape[2]), "fa3")))
        if a.compile:
            runs.append((f"{b}+compile", torch.compile(lambda q, k, v, b=b: attention(q, k, v, b), fullgraph=True)))

    q, k, v, dout = _inputs(a.batch, a.seq, a.heads, a.kv_heads, a.head_dim, dtype)
    ref = math_reference(q, k, v, dout)
    results: dict[str, dict[str, float]] = {}
    for name, fn in runs:
        try:
            res = errors(fn, q, k, v, dout, ref)
            res["fwd_ms"], res["ms"] = time_fwd_bwd(fn, q, k, v, dout, a.warmup, a.iters)
        except Exception as e:  # noqa: BLE001 - report any failure and go on with the others
            print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        results[name] = res
        if a.profile:
            try:
                kernels = kernel_times(fn, q, k, v, dout)
            except Exception as e:  # noqa: BLE001 - the profiler is optional here
                print(f"  {name}: profiler failed: {type(e).__name__}: {e}")
                continue
            print(f"  {name} kernels, ms per fwd+bwd (total {sum(t for _, t in kernels):.3f}):")
            for kname, t in kernels[:10]:
                print(f"    {t:8.3f}  {kname[:150]}")

    base = results.get("sdpa_flash", {}).get("ms", float("nan"))
    print()
    print(
        f"{'backend':<20}{'fwd ms':>8}{'fwd+bwd ms':>12}{'vs sdpa_flash':>15}   "
        f"{'rel err out / dq / dk / dv (vs fp32)':<38}{'max|err| out / dq':<20}card"
    )
    for name, r in results.items():
        ratio = base / r["ms"] if not math.isnan(base) else float("nan")
        rel = " / ".join(f"{r[f'rel_{t}']:.2e}" for t in ("out", "dq", "dk", "dv"))
        mx = f"{r['max_out']:.1e} / {r['max_dq']:.1e}"
        print(f"{name:<20}{r['fwd_ms']:>8.3f}{r['ms']:>12.3f}{ratio:>14.2f}x   {rel:<38} {mx:<20}{card}")
    print("(ratio = sdpa_flash fwd+bwd time / backend's: >1 is faster than sdpa_flash)")
    if a.json:
        out = {"card": card, "torch": torch.__version__, "shape": shape, "fa3_build": fa3_desc, "results": results}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
