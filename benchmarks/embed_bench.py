"""The input stage (token embedding, product-key bigram, RMS norm, SmearGate) at `record`'s micro-batch on one GPU:
GPT.embed's plain path compiled by inductor (coordinate descent on, as the CD set trains) against
lmcore.embed_kernel's op (train.fused_embed), forward and forward + backward, in the same process; the plain path
with the tables frozen (no table gradients: what the atomics' scatter costs); then the op's kernels alone (the
sort, the whole backward, the forward, the backward's two parts) by tile choice. Ids drawn from a Zipf-like
distribution over the vocabulary (`--ids zipf`, the default: a few ids hold most positions, as in text) or
uniformly. Prints Markdown
tables of GPU microseconds a call, queued behind a sleeping kernel (qk_kernel_bench.queued_us).

usage: python benchmarks/embed_bench.py [--iters N] [--ids zipf|uniform]
"""

from __future__ import annotations

import argparse
import functools

import torch
from qk_kernel_bench import queued_us  # this folder: timing

import lmcore.embed_kernel as EK
from lmcore.config import preset
from lmcore.model import GPT, previous_ids

TABLES = ("tok_emb.weight", "bigram.embed_prev.weight", "bigram.embed_cur.weight")
PARAMS = (*TABLES, "bigram.scale", "smear.gate")
FWD_CHOICES = [(8, 512, 8), (4, 512, 4), (16, 512, 16)]  # (rows, columns, warps)
DE_CHOICES = [(4, 16, 2), (4, 1, 2), (2, 32, 2), (4, 32, 2), (4, 16, 4), (8, 8, 4), (2, 16, 1)]  # the backward's
# first kernel: (rows, row blocks, warps)
TABLES_CHOICES = [(16, 64, 4), (16, 32, 2), (16, 64, 2), (16, 128, 4), (16, 256, 8), (32, 64, 4)]  # (rows, columns,
# warps) of its second


def draw_ids(kind: str, b: int, t: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.ones(vocab, device="cuda") if kind == "uniform" else 1.0 / torch.arange(1, vocab + 1, device="cuda")
    return torch.multinomial(w, b * t, replacement=True, generator=gen).view(b, t)


def autocast_call(fn, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as training runs the model
        return fn(ids)


def forward_backward(fn, ids, params, dy):
    return torch.autograd.grad(autocast_call(fn, ids), params, dy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ids", choices=("zipf", "uniform"), default="zipf")
    args = ap.parse_args()
    torch._inductor.config.coordinate_descent_tuning = True
    cfg = preset("record")
    b, t = cfg.train.batch_tokens // (cfg.train.grad_accum * cfg.data.seq_len), cfg.data.seq_len
    model = GPT(cfg.model).cuda()
    model.cast_embeddings(torch.bfloat16)
    ids = draw_ids(args.ids, b, t, cfg.model.vocab_size)
    top = torch.bincount(ids.flatten()).max().item()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; micro-batch {b} x {t}, model_dim "
          f"{cfg.model.model_dim}, vocab {cfg.model.vocab_size}; ids {args.ids} (the most frequent id at {top} of "
          f"{b * t} positions); GPU time a call, queued")
    print()
    print("| path | forward us | backward us | total us | vs plain |")
    print("|---|---|---|---|---|")
    p = dict(model.named_parameters())
    dy = torch.randn(b, t, cfg.model.model_dim, device="cuda", dtype=torch.bfloat16)
    base = None
    for label, fused, grads in (("plain, inductor", False, PARAMS), ("plain, tables frozen", False, PARAMS[3:]),
                                ("fused (lmcore.embed_kernel)", True, PARAMS)):
        torch._dynamo.reset()
        model.embed_op = None
        if fused:
            model.use_fused_embed()
        for n in TABLES:  # frozen: no table gradients in the compiled backward
            p[n].requires_grad_(n in grads)
        fn = torch.compile(model.embed, fullgraph=True, dynamic=False)
        fwd = queued_us(functools.partial(autocast_call, fn, ids), args.iters)
        both = queued_us(functools.partial(forward_backward, fn, ids, [p[n] for n in grads], dy), args.iters)
        base = base or both
        print(f"| {label} | {fwd:.1f} | {both - fwd:.1f} | {both:.1f} | {base / both:.2f}x |")

    prev = previous_ids(ids, False, 0)
    tables = [p[n].detach() for n in TABLES]
    dt = tables[0].dtype
    rest = (p["bigram.scale"].detach().to(dt), p["smear.gate"].detach().to(dt))
    _, rstd = EK._forward_triton(ids, prev, *tables, *rest, -1)
    de, _, _ = EK._backward_de(dy, ids, prev, *tables, *rest, rstd, -1, *EK.BWD_TILE[:3])
    print()
    print("The op's kernels alone, by tile choice:")
    print()
    print("| part | tile | us |")
    print("|---|---|---|")
    print(f"| the sort of the ids | | {queued_us(lambda: EK._sorted(ids, cfg.model.vocab_size), args.iters):.1f} |")
    print(f"| whole backward | {EK.BWD_TILE} | "
          f"{queued_us(lambda: EK._backward_triton(dy, ids, prev, *tables, *rest, rstd, -1), args.iters):.1f} |")
    for tile in FWD_CHOICES:
        us = queued_us(lambda: EK._forward_triton(ids, prev, *tables, *rest, -1, tile), args.iters)
        print(f"| forward | {tile}{' (lmcore)' if tile == EK.FWD_TILE else ''} | {us:.1f} |")
    for tile in DE_CHOICES:
        us = queued_us(lambda: EK._backward_de(dy, ids, prev, *tables, *rest, rstd, -1, *tile), args.iters)
        print(f"| backward: de, partial sums | {tile}{' (lmcore)' if tile == EK.BWD_TILE[:3] else ''} | {us:.1f} |")
    for tile in TABLES_CHOICES:
        us = queued_us(lambda: EK._backward_tables(de, ids, prev, *tables, rest[0], -1, *tile), args.iters)
        print(f"| backward: sort, tables' sums | {tile}{' (lmcore)' if tile == EK.BWD_TILE[3:] else ''} | "
              f"{us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
