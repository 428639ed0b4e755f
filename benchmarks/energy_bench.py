"""Joules a call of the MLP's kernels at `record`'s micro-batch, from the board's energy counter (NVML), beside
their ms a call: at the card's power limit a step takes about its energy over the limit, so a kernel made shorter
without doing less (fewer bytes moved, fewer instructions) leaves the step where it was (benchmarks/RESULTS.md,
session 35: every lmcore run of sessions 32-35 at 693-694 W of 700, capped in all its samples).

Each row runs its callable back to back for --seconds (batches of 20 calls, the host's clock read after each
batch's synchronize), after a warm-up as long; the energy counter (millijoules since the driver loaded) is read at
the start and the end. Reported: ms a call, joules a call, mean watts, the SM clock read in the middle, and joules
a call above the card's idle power (measured first, --idle seconds asleep). The counter is the whole board's (GPU
and memory), so the rows' differences are what matters. Rows: cuBLAS's GEMM alone, the ping-pong kernel forward at
lmcore.mlp_pingpong.TILE and at TILE_QUARTER (train.fused_mlp_quarter_tiles), its forward with the sign path
(train.fused_mlp_sign: post and pre's signs, pre not written) and its backward both ways (B as (K, N), as training
runs it). With --attention, where flash_attn_interface imports (FA3; carry its wheel), also the attention's kernels
at `record`'s micro-batch as the fastest sets run them (8 heads after train.expand_kv, head dim 64, causal): FA3's
forward, and its forward and backward together, and cuBLAS's GEMMs of the fused q/k/v projection (512 -> 1,024)
and the output projection (512 -> 512), each forward, dX and dW. With --memory, memory-bound kernels at `record`'s
micro-batch, for their watts against the GEMMs' (what a millisecond taken out of such a kernel saves at the power
limit): a bf16 copy of the residual stream (tokens, 512), q's RMSNorm + RoPE + gain kernel forward and backward
(lmcore.kernels; its PyTorch math off CUDA) and inductor's kernel for a residual add and the RMSNorm after it.

usage: python benchmarks/energy_bench.py [--tokens 98304] [--seconds 3] [--idle 2] [--attention] [--memory]
       [--rows REGEX] [--json PATH]
GPU only (sm_90) with pynvml.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Callable

import torch

CALLS_PER_STEP = 11 * 8  # layers x micro-batches: one MLP forward and backward each


def energy_per_call(fn: Callable[[], object], seconds: float, energy_mj: Callable[[], int],
                    sync: Callable[[], None], clock_mhz: Callable[[], int] = lambda: 0, batch: int = 20) -> dict:
    """Run fn in batches of `batch` calls until `seconds` have passed (the host's clock after each batch's sync),
    reading the energy counter (millijoules) before and after: ms and joules a call, watts, and the clock read at
    the first batch past half the time."""
    sync()
    e0, t0 = energy_mj(), time.perf_counter()
    calls, mhz, now = 0, 0, t0
    while now - t0 < seconds:
        for _ in range(batch):
            fn()
        sync()
        calls += batch
        now = time.perf_counter()
        if not mhz and now - t0 >= seconds / 2:
            mhz = clock_mhz()
    joules = (energy_mj() - e0) / 1000
    return {"calls": calls, "ms": (now - t0) * 1000 / calls, "j_per_call": joules / calls,
            "watts": joules / (now - t0), "sm_mhz": mhz}


def above_idle(row: dict, idle_watts: float) -> float:
    """Joules a call above what the board draws idle over the call's time."""
    return row["j_per_call"] - idle_watts * row["ms"] / 1000


def table_row(name: str, row: dict, idle_watts: float) -> str:
    """The printed table's line for one row (its JSON's numbers; the heading in main)."""
    return (f"| {name} | {row['ms']:.3f} | {row['j_per_call']:.4f} | {above_idle(row, idle_watts):.4f} "
            f"| {row['watts']:.0f} | {row['sm_mhz']} | {CALLS_PER_STEP * row['j_per_call']:.2f} |")


def attention_rows(tokens: int, seq: int = 2048, heads: int = 8, dim: int = 64,
                   device: str = "cuda") -> dict[str, Callable[[], object]]:
    """--attention's rows (module docstring), or none where flash_attn_interface does not import (a line says so)."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError as e:
        print(f"# --attention: no FA3 rows ({e})")
        return {}
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(tokens // seq, seq, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def forward(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(a, b, c, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some builds return (out, lse)

    def forward_backward() -> None:
        torch.autograd.grad(forward(qg, kg, vg), (qg, kg, vg), do)

    rows: dict[str, Callable[[], object]] = {"FA3 forward": lambda: forward(q, k, v),
                                             "FA3 forward and backward": forward_backward}
    x = torch.randn(tokens, 512, device=device, dtype=torch.bfloat16)
    for name, n in (("q/k/v", 1024), ("output projection", 512)):
        w = torch.randn(n, 512, device=device, dtype=torch.bfloat16) / 512**0.5
        dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        rows[f"cuBLAS {name} 512 -> {n}: forward"] = lambda x=x, w=w: x @ w.t()
        rows[f"cuBLAS {name} 512 -> {n}: dX"] = lambda dy=dy, w=w: dy @ w
        rows[f"cuBLAS {name} 512 -> {n}: dW"] = lambda dy=dy, x=x: dy.t() @ x
    return rows


def memory_rows(tokens: int, seq: int = 2048, device: str = "cuda",
                compiler: Callable[[Callable], Callable] = torch.compile) -> dict[str, Callable[[], object]]:
    """--memory's rows (module docstring), at `record`'s shapes; tokens a multiple of seq. `compiler` makes the
    add + norm row's kernel (torch.compile: inductor's)."""
    import lmcore.kernels as K
    from lmcore.config import preset
    from lmcore.layers import rms_norm, rope_tables

    cfg = preset("record").model
    torch.manual_seed(0)
    x, a = (torch.randn(tokens, cfg.model_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    y = torch.empty_like(x)
    q = torch.randn(tokens // seq, seq, cfg.num_heads, cfg.head_dim, device=device, dtype=torch.bfloat16)
    g = torch.randn_like(q)
    gain = torch.full((cfg.num_heads,), 1.5, device=device)
    cos, sin = rope_tables(cfg, seq, torch.device(device))
    triton = K._use_triton(q, cos.size(-1))
    fwd, bwd = (K._forward_triton, K._backward_triton) if triton else (K._forward_math, K._backward_math)
    _, rstd = fwd(q, cos, sin, gain)

    def add_norm(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = u + v
        return h, rms_norm(h)

    return {"copy of the residual stream (tokens, 512) bf16": lambda: y.copy_(x),
            "q's RMSNorm + RoPE + gain, forward": lambda: fwd(q, cos, sin, gain),
            "q's RMSNorm + RoPE + gain, backward": lambda: bwd(g, q, rstd, cos, sin, gain),
            "inductor: residual add + RMSNorm": lambda f=compiler(add_norm): f(x, a)}


def main() -> int:
    import pynvml

    import lmcore.mlp_pingpong as PP
    from mlp_pingpong_bench import SLOPE, inputs, pingpong_bwd, pingpong_fwd, pingpong_fwd_sign

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48 * 2048)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--idle", type=float, default=2.0)
    ap.add_argument("--attention", action="store_true", help="also FA3's and the attention's GEMMs' rows")
    ap.add_argument("--memory", action="store_true", help="also memory-bound kernels' rows")
    ap.add_argument("--rows", default=None, help="only the rows whose name matches this regular expression")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    uuid = pynvml.nvmlDeviceGetUUID(handle)

    def energy() -> int:  # millijoules since the driver loaded
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    def clock() -> int:
        return pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)

    sync = torch.cuda.synchronize
    x, w, wp, g = inputs(args.tokens)
    pre, _ = pingpong_fwd(x, w, PP.TILE)
    signs, post = pingpong_fwd_sign(x, w, PP.TILE)
    rows = {
        "cuBLAS GEMM alone, forward (x w_fc^T)": lambda: x @ w.t(),
        "cuBLAS GEMM alone, backward (dy w_proj)": lambda: g @ wp,
        "ping-pong forward, TILE": lambda: pingpong_fwd(x, w, PP.TILE),
        "ping-pong forward, TILE_QUARTER": lambda: pingpong_fwd(x, w, PP.TILE_QUARTER),
        "ping-pong forward, sign path": lambda: pingpong_fwd_sign(x, w, PP.TILE),
        "ping-pong backward, TILE": lambda: pingpong_bwd(g, wp, pre, PP.TILE, b_kn=True),
        "ping-pong backward, sign path": lambda: pingpong_bwd(g, wp, post, PP.TILE, b_kn=True, signs=signs),
        **(attention_rows(args.tokens) if args.attention else {}),
        **(memory_rows(args.tokens) if args.memory else {}),
    }
    if args.rows:
        rows = {name: fn for name, fn in rows.items() if re.search(args.rows, name)}
    sync()
    e0, t0 = energy(), time.perf_counter()
    time.sleep(args.idle)
    idle_watts = (energy() - e0) / 1000 / (time.perf_counter() - t0)
    print(f"# {torch.cuda.get_device_name()} {uuid}, torch {torch.__version__}, tokens {args.tokens}, power limit "
          f"{pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000:.0f} W, idle {idle_watts:.1f} W")
    out = {"device": torch.cuda.get_device_name(), "uuid": uuid, "tokens": args.tokens, "idle_watts": idle_watts,
           "seconds": args.seconds, "rows": {}}
    print("\n| kernel | ms a call | J a call | J above idle | W | SM MHz | J a step (88 calls) |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in rows.items():
        energy_per_call(fn, args.seconds, energy, sync)  # warm-up, as long: the clock settles
        r = out["rows"][name] = energy_per_call(fn, args.seconds, energy, sync, clock)
        print(table_row(name, r, idle_watts), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
