"""q/k RMSNorm + RoPE + gain at `record`'s micro-batch on one GPU: the plain path compiled by
inductor (as in training: bf16 in, fp32 math, bf16 out) against lmcore.kernels.qk_norm_rope
(train.fused_qk_norm_rope), forward + backward, in the same process. Prints a Markdown table:
shape, path, forward us, backward us (the median forward + backward less the median forward),
total us, effective GB/s (the bytes a pass must move: forward reads x and writes out, backward
reads the gradient and x and writes dx) and the ratio.

usage: python benchmarks/qk_kernel_bench.py [--iters N]
"""

from __future__ import annotations

import argparse
import functools

import torch
from attention_bench import median_ms  # this folder: the CUDA-event timing of the attention benchmark

from lmcore.config import preset
from lmcore.kernels import qk_norm_rope
from lmcore.model import apply_rope, rms_norm, rope_tables


def plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = apply_rope(rms_norm(x), cos, sin) * gain[None, None, :, None]
    return y.to(torch.bfloat16)  # the attention kernel's input


def fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return qk_norm_rope(x, cos, sin, gain)


def forward_backward(fn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor, dy: torch.Tensor):
    return torch.autograd.grad(fn(x, cos, sin, gain), (x, gain), dy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    cfg = preset("record")
    b, t = cfg.train.batch_tokens // (cfg.train.grad_accum * cfg.data.seq_len), cfg.data.seq_len
    cos, sin = (z.cuda() for z in rope_tables(cfg.model, t, torch.device("cpu")))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; micro-batch {b} x {t}")
    print()
    print("| tensor | path | forward us | backward us | total us | GB/s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, heads in (("q", cfg.model.num_heads), ("k", cfg.model.num_kv_heads)):
        x = torch.randn(b, t, heads, cfg.model.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gain = torch.full((heads,), 1.5, device="cuda", requires_grad=True)
        dy = torch.randn_like(x)
        base = None
        for label, fn in (("plain, inductor", torch.compile(plain, fullgraph=True, dynamic=False)),
                          ("fused (lmcore.kernels)", fused)):
            fwd = 1000.0 * median_ms(functools.partial(fn, x, cos, sin, gain), 5, args.iters)
            both = 1000.0 * median_ms(functools.partial(forward_backward, fn, x, cos, sin, gain, dy), 5, args.iters)
            moved = 5 * x.numel() * x.element_size()
            base = base or both
            print(f"| {name} {tuple(x.shape)} | {label} | {fwd:.1f} | {both - fwd:.1f} | {both:.1f} | "
                  f"{moved / both / 1e3:.0f} | {base / both:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
