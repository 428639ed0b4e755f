"""XSA + the attention gate at `record`'s micro-batch on one GPU: the model's plain path compiled
by inductor (as in training: bf16 attention output, value vectors and gate logits; fp32 math)
against lmcore.xsa_kernel.xsa_gate (train.fused_xsa_gate), forward + backward, in the same
process, for a gated layer and one without the gate. Then the fused kernels alone for a few
tile choices (rows a program, warps). Prints Markdown tables: GPU microseconds a call (calls
queued back to back: qk_kernel_bench.queued_us), effective GB/s (the bytes a pass must move:
forward reads y and v and writes out; backward reads the gradient, y and v and writes dy and
dv; the gate's few bytes left out) and the ratio to the plain path.

usage: python benchmarks/xsa_kernel_bench.py [--iters N]
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from qk_kernel_bench import micro_batch_header, print_sweep, queued_us, sweep_row  # this folder: timing, tables

from lmcore import xsa_kernel as kernels
from lmcore.config import preset

CHOICES = [(8, 4), (16, 4), (16, 8), (32, 8)]  # (rows a program, warps)


def plain(y: torch.Tensor, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        b, t, h, d = y.shape
        yg = y.view(b, t, v.size(2), -1, d)
        vn = F.normalize(v, dim=-1).unsqueeze(-2)
        out = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(b, t, h, d)
        if z is not None:
            out = out * torch.sigmoid(z.to(out.dtype)).unsqueeze(-1)
    return out.to(torch.bfloat16)  # the output projection's input


def forward_backward(fn, y, v, z, dout):
    inputs = (y, v) if z is None else (y, v, z)
    return torch.autograd.grad(fn(y, v, z), inputs, dout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    cfg = preset("record")
    m = cfg.model
    b, t = micro_batch_header(cfg, "layer")
    sweep = []
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    y = torch.randn(b, t, m.num_heads, m.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, t, m.num_kv_heads, m.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(y)
    yb, vb = y.numel() * y.element_size(), v.numel() * v.element_size()
    for name, gated in (("gated", True), ("no gate", False)):
        z = torch.randn(b, t, m.num_heads, device="cuda", dtype=torch.bfloat16, requires_grad=True) if gated else None
        base = None
        for label, fn in (("plain, inductor", compiled), ("fused (lmcore.xsa_kernel)", kernels.xsa_gate)):
            fwd = queued_us(functools.partial(fn, y, v, z), args.iters)
            both = queued_us(functools.partial(forward_backward, fn, y, v, z, dout), args.iters)
            base = base or both
            print(f"| {name} | {label} | {fwd:.1f} | {both - fwd:.1f} | {both:.1f} | "
                  f"{(5 * yb + 3 * vb) / both / 1e3:.0f} | {base / both:.2f}x |")
        zd = None if z is None else z.detach()
        for rows, warps in CHOICES:
            f = queued_us(functools.partial(kernels._xsa_forward_triton, y.detach(), v.detach(), zd, rows, warps), args.iters)
            bw = queued_us(functools.partial(kernels._xsa_backward_triton, dout, y.detach(), v.detach(), zd, rows, warps),
                           args.iters)
            mark = " (lmcore)" if rows == kernels.XSA_TILE // (y.size(2) // v.size(2) * y.size(3)) and warps == kernels.XSA_WARPS else ""
            sweep.append(sweep_row(name, f"{rows}{mark}", warps, f, 2 * yb + vb, bw, 3 * yb + 2 * vb))
    print_sweep("The fused kernels alone, by tile choice:", "layer", sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
