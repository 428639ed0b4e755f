"""train.fa3_dq_accum at `record`'s micro-batch on one GPU: the path q's gradient takes from FA3's
backward to q's RMSNorm + RoPE backward, with and without the lever, in the same process.

    without: FA3's backward (rowsums given, as train.fa3_xsa_rowsum runs it), its dQ convert to
             bf16, then q's backward kernel on that dq (lmcore.kernels._backward_triton)
    with:    FA3's backward with dq_accum_only (no convert), then q's backward kernel on FA3's fp32
             accumulator (lmcore.kernels._q_backward_acc_triton)

Needs FA3 built with FA3_DPSUM=1 (scripts/build_fa3.sh; its bwd has dq_accum_only). Prints a
Markdown table: GPU microseconds a layer call for FA3's backward and for q's kernel, each way,
the difference, and that difference times the 88 layer calls of a `record` step (11 layers, 8
micro-batches). Then q's kernel from the accumulator alone at each of --warps (lmcore's:
kernels.WARPS). Times are of calls queued back to back (qk_kernel_bench.queued_us). Also checks
that both ways give the same dx from one accumulator (bit for bit: the same fp32 products) before
timing; two FA3 calls differ in their atomics' order of additions, so their dq are not compared.
Session 28 (one H200): 1,256.0 us a layer call without, 1,207.4 with: 4.27 ms a step.

usage: python benchmarks/dq_accum_bench.py [--iters N]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qk_kernel_bench import queued_us  # noqa: E402  (benchmarks/, not a package)

from lmcore import kernels  # noqa: E402
from lmcore.config import preset  # noqa: E402
from lmcore.fa3_xsa import _fa3_backward, fa3_rowsum_reason, rounded_rows  # noqa: E402
from lmcore.layers import rope_tables  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warps", default="4,8,16", help="warps a program to time q's kernel from the accumulator at")
    args = ap.parse_args()
    reason = fa3_rowsum_reason(dq_accum=True)
    if reason:
        print(f"dq_accum_bench: {reason}", file=sys.stderr)
        return 2
    from flash_attn_interface import _flash_attn_forward

    cfg = preset("record")
    m = cfg.model
    b, t, h, d = cfg.train.batch_tokens // cfg.train.grad_accum // cfg.data.seq_len, cfg.data.seq_len, m.num_heads, m.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, t, h, d, generator=g, device="cuda").bfloat16() for _ in range(4))
    cos, sin = (z.float().cuda().contiguous() for z in rope_tables(m, t, torch.device("cpu")))
    gain = torch.rand(h, generator=g, device="cuda") + 0.5
    scale = d ** -0.5
    out, lse, *_ = _flash_attn_forward(q, k, v, softmax_scale=scale, causal=True)
    softmax_d = torch.zeros(b, h, rounded_rows(t), device="cuda")
    softmax_d[:, :, :t] = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    _, rstd = kernels._forward_math(q, cos, sin, gain)
    dx_acc = torch.empty_like(q)

    acc = _fa3_backward(dout, q, k, v, out, lse, softmax_d, scale, True)[0]  # lmcore.fa3_xsa's op, as training runs it
    dq = _fa3_backward(dout, q, k, v, out, lse, softmax_d, scale, False)[0]
    kernels._q_backward_acc_triton(acc, q, rstd, cos, sin, gain, dx_acc, scale)
    read = (kernels.from_accumulator(acc, t) * scale).contiguous()
    same = torch.equal(dx_acc, kernels._backward_triton(read, q, rstd, cos, sin, gain)[0])

    rows = []
    for name, accum_only in (("without (convert + bf16 dq)", False), ("with (fp32 accumulator)", True)):
        fa3_us = queued_us(functools.partial(_fa3_backward, dout, q, k, v, out, lse, softmax_d, scale, accum_only),
                           args.iters)
        if accum_only:
            q_us = queued_us(functools.partial(kernels._q_backward_acc_triton, acc, q, rstd, cos, sin, gain, dx_acc,
                                               scale), args.iters)
        else:
            q_us = queued_us(functools.partial(kernels._backward_triton, dq, q, rstd, cos, sin, gain), args.iters)
        rows.append((name, fa3_us, q_us))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; micro-batch {b} x {t}, {h} heads of {d}; "
          f"{args.iters} queued calls each")
    print(f"dx equal both ways from one accumulator: {same}\n")
    print("| q's gradient | FA3 backward us | q backward us | sum us |")
    print("|---|---|---|---|")
    for name, fa3_us, q_us in rows:
        print(f"| {name} | {fa3_us:.1f} | {q_us:.1f} | {fa3_us + q_us:.1f} |")
    saved = (rows[0][1] + rows[0][2]) - (rows[1][1] + rows[1][2])
    print(f"\nsaved a layer call: {saved:.1f} us; x 88 calls a record step: {saved * 88 / 1000:.2f} ms")
    print("\n| warps | q backward from the accumulator us |\n|---|---|")
    for warps in (int(w) for w in args.warps.split(",")):
        us = queued_us(functools.partial(kernels._q_backward_acc_triton, acc, q, rstd, cos, sin, gain, dx_acc, scale,
                                         warps), args.iters)
        print(f"| {warps}{' (lmcore)' if warps == kernels.WARPS else ''} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
