"""The training loss at `record`'s micro-batch on one GPU: the logit softcap and the mean
cross-entropy over N = 98,304 rows of V = 1,024 bf16 logits (cap 30), forward + backward, as the
model's plain path compiled by inductor (`F.cross_entropy((cap * tanh(z / cap)).float(), t)`, as
GPT.forward writes it) against lmcore.ce_kernel.softcap_cross_entropy (train.fused_softcap_ce).
Then the op's Triton kernels alone at the tile choices given with --tiles (rows a program x warps).

usage: python benchmarks/ce_kernel_bench.py [--tiles 1x1,2x2,4x8] [--json PATH]

GPU only. Both paths are compiled (fullgraph), as training calls them inside the compiled model, and
each pass is captured once in a CUDA graph, so the times are the GPU's and not the host's (eager
calls queued back to back were host-bound: 0.6-0.9 ms a forward + backward). Times are
fp8_matmul_bench.timed's of the graph's replays (10 in a row, median of 20). GB/s counts the bytes a pass must move: the
forward reads z, the backward reads z and writes dz (3 N V 2 bytes; the targets' and the rows'
few bytes left out). Errors are against the fp32 math in eager PyTorch on z's values: the loss's
relative error, and dz's largest absolute error over the largest |dz|.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from fp8_matmul_bench import timed  # this folder: CUDA-event median timing, shared

from lmcore import ce_kernel as CE

N, V, CAP = 98_304, 1_024, 30.0  # record's micro-batch (48 x 2,048 tokens) and vocabulary; its logit softcap


def plain(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((CAP * torch.tanh(z / CAP)).float(), t)


def fused(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return CE.softcap_cross_entropy(z, t, CAP).mean()


def loss_and_grad(fn, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = fn(z, t)
    return loss, torch.autograd.grad(loss, z)[0]


def graphed(fn):
    """fn captured in a CUDA graph after 3 warm-ups on a side stream (the compile among them): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def row(path: str, fwd: float, both: float, loss: torch.Tensor, dz: torch.Tensor,
        ref: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """A table row: times (ms), GB/s, and the errors against ref (the fp32 loss and dz)."""
    ref_loss, ref_dz = ref
    return {"path": path, "fwd_ms": fwd, "fwd_bwd_ms": both, "gb_s": 3 * N * V * 2 / both / 1e6,
            "loss_rel_err": ((loss.float() - ref_loss).abs() / ref_loss.abs()).item(),
            "dz_rel_err": ((dz.float() - ref_dz).abs().max() / ref_dz.abs().max()).item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="1x1,2x1,1x2,2x2,4x4,4x8", help="rows a program x warps, comma-separated")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(N, V, generator=g, device="cuda") * 8).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device="cuda")
    ref = loss_and_grad(plain, z.detach().float().requires_grad_(), t)  # eager fp32 on z's values
    rows = []
    for name, fn in (("plain, inductor", plain), ("fused (lmcore.ce_kernel)", fused)):
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
        fwd = timed(graphed(lambda fn=fn: fn(z.detach(), t)))
        both = timed(graphed(lambda fn=fn: loss_and_grad(fn, z, t)))
        rows.append(row(name, fwd, both, *loss_and_grad(fn, z, t), ref))
    zd, gr = z.detach(), torch.full((N,), 1.0 / N, device="cuda")
    for tile in args.tiles.split(","):
        r, w = (int(x) for x in tile.split("x"))
        loss, lse = CE._forward_triton(zd, t, CAP, r, w)
        fwd = timed(graphed(lambda r=r, w=w: CE._forward_triton(zd, t, CAP, r, w)))
        bwd = timed(graphed(lambda r=r, w=w: CE._backward_triton(gr, zd, t, lse, CAP, r, w)))
        mark = " (lmcore)" if (r, w) == CE.default_tile(V) else ""
        rows.append(row(f"kernels, {r} rows x {w} warps{mark}", fwd, fwd + bwd, loss.mean(),
                        CE._backward_triton(gr, zd, t, lse, CAP, r, w), ref))
    print(f"{torch.cuda.get_device_name()}: N {N:,} x V {V:,} bf16, cap {CAP:g}\n")
    print("| path | fwd ms | bwd ms | fwd+bwd ms | GB/s | loss rel err | dz rel err |\n|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['path']} | {x['fwd_ms']:.3f} | {x['fwd_bwd_ms'] - x['fwd_ms']:.3f} | {x['fwd_bwd_ms']:.3f} | "
              f"{x['gb_s']:.0f} | "
              f"{x['loss_rel_err']:.1e} | {x['dz_rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "N": N, "V": V, "cap": CAP, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
