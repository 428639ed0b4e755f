"""q/k RMSNorm + RoPE + gain at `record`'s micro-batch on one GPU: the plain path compiled by
inductor (as in training: bf16 in, fp32 math, bf16 out) against lmcore.kernels.qk_norm_rope
(train.fused_qk_norm_rope), forward + backward, in the same process; q with its gain, k
without (as in the model). Then the fused kernels alone for a few tile choices (rows a
program, warps). Prints Markdown tables: GPU microseconds a call, effective GB/s (the bytes a
pass must move: forward reads x and writes out, backward reads the gradient and x and writes
dx) and the ratio to the plain path.

Times are of calls queued back to back behind a sleeping kernel, so the GPU never waits for
the host, as in a training step, where the host runs ahead (session 7's first version timed
one call at a time and mostly measured the host's launch overhead).

usage: python benchmarks/qk_kernel_bench.py [--iters N]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from lmcore import kernels
from lmcore.config import preset
from lmcore.layers import apply_rope, rms_norm, rope_tables

CHOICES = [(16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]  # (rows a program, warps)


def queued_us(call: Callable[[], object], iters: int) -> float:
    """GPU microseconds a call: `iters` calls queued behind a ~50 ms sleep kernel, timed by
    CUDA events around them (the host enqueues them while the GPU sleeps)."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return 1000.0 * start.elapsed_time(end) / iters


def micro_batch_header(cfg, first: str) -> tuple[int, int]:
    """Print the card line and the comparison table's header; return record's micro-batch (B, T)."""
    b, t = cfg.train.batch_tokens // (cfg.train.grad_accum * cfg.data.seq_len), cfg.data.seq_len
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; micro-batch {b} x {t}; GPU time a call, queued")
    print()
    print(f"| {first} | path | forward us | backward us | total us | GB/s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    return b, t


def sweep_row(name: str, tile: str, warps: int, fwd_us: float, fwd_bytes: int, bwd_us: float, bwd_bytes: int) -> str:
    """One row of the tile-choice table: times and effective GB/s, forward and backward."""
    return (f"| {name} | {tile} | {warps} | {fwd_us:.1f} | {fwd_bytes / fwd_us / 1e3:.0f} | "
            f"{bwd_us:.1f} | {bwd_bytes / bwd_us / 1e3:.0f} |")


def print_sweep(title: str, first: str, rows: list[str]) -> None:
    print()
    print(title)
    print()
    print(f"| {first} | rows a program | warps | forward us | GB/s | backward us | GB/s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = apply_rope(rms_norm(x), cos, sin)
        if gain is not None:
            y = y * gain[None, None, :, None]
    return y.to(torch.bfloat16)  # the attention kernel's input


def forward_backward(fn, x, cos, sin, gain, dy):
    inputs = (x,) if gain is None else (x, gain)
    return torch.autograd.grad(fn(x, cos, sin, gain), inputs, dy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    cfg = preset("record")
    b, t = micro_batch_header(cfg, "tensor")
    cos, sin = (z.cuda().float().contiguous() for z in rope_tables(cfg.model, t, torch.device("cpu")))
    sweep = []
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    for name, heads, with_gain in (("q", cfg.model.num_heads, True), ("k", cfg.model.num_kv_heads, False)):
        x = torch.randn(b, t, heads, cfg.model.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gain = torch.full((heads,), 1.5, device="cuda", requires_grad=True) if with_gain else None
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        base = None
        for label, fn in (("plain, inductor", compiled), ("fused (lmcore.kernels)", kernels.qk_norm_rope)):
            fwd = queued_us(functools.partial(fn, x, cos, sin, gain), args.iters)
            both = queued_us(functools.partial(forward_backward, fn, x, cos, sin, gain, dy), args.iters)
            base = base or both
            print(f"| {name} {tuple(x.shape)} | {label} | {fwd:.1f} | {both - fwd:.1f} | {both:.1f} | "
                  f"{5 * nbytes / both / 1e3:.0f} | {base / both:.2f}x |")
        xd, g = x.detach(), gain.detach() if with_gain else None
        _, rstd = kernels._forward_triton(xd, cos, sin, g)
        for rows, warps in CHOICES:
            f = queued_us(functools.partial(kernels._forward_triton, xd, cos, sin, g, rows=rows, warps=warps), args.iters)
            bw = queued_us(functools.partial(kernels._backward_triton, dy, xd, rstd, cos, sin, g, rows=rows, warps=warps), args.iters)
            mark = " (lmcore)" if rows == kernels.TILE // x.size(3) and warps == kernels.WARPS else ""
            sweep.append(sweep_row(name, f"{rows}{mark}", warps, f, 2 * nbytes, bw, 3 * nbytes))
    print_sweep("The fused kernels alone (the backward's includes summing the gain's partials), by tile choice:",
                "tensor", sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
