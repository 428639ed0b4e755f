"""lmcore.mlp_pingpong's warp-specialized kernel against lmcore.mlp_kernel's persistent TMA kernel
and cuBLAS's GEMM alone, at `record`'s MLP (512 -> 1536) and micro-batch, forward and backward.

First the checks: at each tile, on a small shape with row tails (1000 tokens) and at the
micro-batch, the ping-pong kernel's pre, post and dpre against the TMA kernel's (max abs
difference over the largest |value|; the two differ only by the GEMM's accumulation order, so
this is small, not zero) and against the PyTorch math (_fc_math, _dpre_math); dpre_kn is the
backward with w_proj as stored, (K, N). Then ms a call (fp8_matmul_bench.timed: 10 calls in a
row, median of 20), and what 88 calls a step (11 layers x 8 micro-batches) would save over the
TMA kernel. Each tile's backward also as training ran it before session 25 (w_proj transposed
into a copy each call) and as it runs now (B as (K, N), no copy). With --sign, each tile also with
train.fused_mlp_sign's epilogues (the forward writes post and pre's signs, the backward reads post and
the signs; checked: the words equal _pack(pre > 0) and dpre the TMA sign kernel's), and the TMA
kernel's sign path as a row. With --zero, each tile's backward also zeroing a buffer the size of FA3's
dQ accumulator at these tokens (tokens x 8 heads x 64 fp32: train.mlp_zeroes_dq_accum's side job; checked:
all zeros, dpre bit-equal to the backward without it), and the same buffer's zero_() alone as a row: the
pass of FA3's preprocess that the side job replaces. With --probe, each tile's forward also with its epilogue's
TMA stores left out (launch's probe 1: the activation and the shared-memory stores kept), with no epilogue
(probe 2: the accumulator summed to one value a tile), and with pre and post stored from the registers
(probe 3: no shared memory, no TMA; checked: the same pre and post), to tell the GEMM loop from the epilogue
and its stores (their backward column is the plain backward's).

A tile's optional 7th field, PARTS (launch's): 4 runs the forward's epilogue by quarter tiles through half the shared
memory (room for a stage more; lmcore.mlp_pingpong.TILE_QUARTER); such a tile has no backward (its rows: "-").

usage: python benchmarks/mlp_pingpong_bench.py [--tokens 98304] [--tiles BMxBNxBKxSTAGESxREGSxCONSUMERS[xPARTS],...]
       [--sign] [--zero] [--probe] [--json PATH]
GPU only (sm_90).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from fp8_matmul_bench import timed  # this folder: CUDA-event median timing, shared

import lmcore.mlp_kernel as MK
import lmcore.mlp_pingpong as PP

SLOPE = 0.5  # record's leaky_slope
CALLS_PER_STEP = 11 * 8
D, HIDDEN = 512, 1536


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def inputs(tokens: int) -> tuple[torch.Tensor, ...]:
    """(x, w_fc, w_proj, dy) at record's MLP widths, seed 0: the same in the checks and the timings."""
    torch.manual_seed(0)
    x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(HIDDEN, D, device="cuda") / D**0.5).to(torch.bfloat16)
    wp = (torch.randn(D, HIDDEN, device="cuda") / HIDDEN**0.5).to(torch.bfloat16)
    return x, w, wp, torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)


def pingpong_fwd(x, w, tile, probe=0):
    pre = torch.empty(x.size(0), w.size(0), dtype=x.dtype, device=x.device)
    post = torch.empty_like(pre)
    PP.launch(x, w, pre, post, SLOPE, False, MK._sm_count(x.device), tile, probe=probe)
    return pre, post


def pingpong_bwd(g, wp, pre, tile, b_kn=False, signs=None, zero=None):
    """dpre from w_proj transposed, (N, K), or with b_kn as stored, (K, N); with signs, pre is post; `zero`
    (fp32) zeroed beside."""
    out = torch.empty_like(pre)
    PP.launch(g, wp, pre, out, SLOPE, True, MK._sm_count(g.device), tile, b_kn=b_kn, signs=signs, zero=zero)
    return out


def accumulator_floats(tokens: int) -> int:
    """FA3's dQ accumulator's floats at record's 8 heads and head dim 64, rows rounded up to 128."""
    return -(-tokens // 128) * 128 * 8 * 64


def check_zero(tokens: int, tile: tuple) -> dict:
    """The backward with a NaN-filled accumulator-sized buffer to zero: what it left not zero (0 when right)
    and dpre against the backward without it (0: the same kernel, the same GEMM)."""
    x, w, wp, g = inputs(tokens)
    pre = MK._fc_math(x, w, SLOPE)[0]
    buf = torch.full((accumulator_floats(tokens),), float("nan"), device="cuda")
    dpre_z = pingpong_bwd(g, wp, pre, tile, b_kn=True, zero=buf)
    dpre = pingpong_bwd(g, wp, pre, tile, b_kn=True)
    torch.cuda.synchronize()
    return {"tokens": tokens, "zero_left_nonzero": int((buf != 0).sum().item()), "zero_dpre_vs_plain": rel(dpre_z, dpre)}


def pingpong_fwd_sign(x, w, tile):
    """(signs, post): train.fused_mlp_sign's forward, pre not written."""
    post = torch.empty(x.size(0), w.size(0), dtype=x.dtype, device=x.device)
    signs = torch.empty(x.size(0), w.size(0) // 32, dtype=torch.int32, device=x.device)
    PP.launch(x, w, post, post, SLOPE, False, MK._sm_count(x.device), tile, signs=signs)
    return signs, post


def check_sign(tokens: int, tile: tuple) -> dict:
    """The sign path at `tokens` rows: words and post against the plain ping-pong forward's pre and post
    (0 and 0 when right), dpre against the TMA sign kernel's (0: the same accumulation order) and the math."""
    x, w, wp, g = inputs(tokens)
    pre, post = pingpong_fwd(x, w, tile)
    signs, post_s = pingpong_fwd_sign(x, w, tile)
    dpre = pingpong_bwd(g, wp, post, tile, b_kn=True, signs=signs)
    tdpre = MK._dpre_triton(g, wp, post, SLOPE, signs=signs)
    mdpre = MK._dpre_sign_math(g, wp, post, signs, SLOPE)
    torch.cuda.synchronize()
    return {"tokens": tokens, "sign_words_wrong": int((signs != MK._pack(pre > 0)).sum().item()),
            "sign_post_vs_plain": rel(post_s, post), "sign_dpre_vs_tma": rel(dpre, tdpre),
            "sign_dpre_vs_math": rel(dpre, mdpre)}


def forward_only(tile: tuple) -> bool:
    """A tile whose forward's epilogue goes by quarter tiles (7th field 4): launch takes it on the forward only."""
    return len(tile) == 7 and tile[6] == 4


def check(tokens: int, tile: tuple) -> dict:
    """Relative max differences of the ping-pong kernel's outputs at `tokens` rows, and against the default
    tile's (0 where the tile keeps the GEMM's order, as the quarter tiles do). A forward-only tile: pre and post."""
    x, w, wp, g = inputs(tokens)
    pre, post = pingpong_fwd(x, w, tile)
    tpre, tpost = MK._fc_triton(x, w, SLOPE)
    mpre, mpost = MK._fc_math(x, w, SLOPE)
    dpre_, dpost_ = pingpong_fwd(x, w, PP.TILE)
    out = {"tokens": tokens, "pre_vs_tma": rel(pre, tpre), "post_vs_tma": rel(post, tpost),
           "pre_vs_default_tile": rel(pre, dpre_), "post_vs_default_tile": rel(post, dpost_),
           "pre_vs_math": rel(pre, mpre), "post_vs_math": rel(post, mpost)}
    if forward_only(tile):
        return out
    dpre = pingpong_bwd(g, wp.t().contiguous(), mpre, tile)
    dpre_kn = pingpong_bwd(g, wp, mpre, tile, b_kn=True)
    default_kn = pingpong_bwd(g, wp, mpre, PP.TILE, b_kn=True)
    tdpre = MK._dpre_triton(g, wp, mpre, SLOPE)
    mdpre = MK._dpre_math(g, wp, mpre, SLOPE)
    torch.cuda.synchronize()
    return {**out, "dpre_vs_tma": rel(dpre, tdpre), "dpre_kn_vs_tma": rel(dpre_kn, tdpre),
            "dpre_kn_vs_default_tile": rel(dpre_kn, default_kn), "dpre_vs_math": rel(dpre, mdpre),
            "tma_dpre_vs_math": rel(tdpre, mdpre)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48 * 2048)
    ap.add_argument("--tiles", default="128x128x64x4x232x2", help="BMxBNxBKxSTAGESxREGSxCONSUMERS, comma-separated")
    ap.add_argument("--sign", action="store_true", help="each tile also with train.fused_mlp_sign's epilogues")
    ap.add_argument("--zero", action="store_true", help="each tile's backward also zeroing FA3's dQ accumulator")
    ap.add_argument("--probe", action="store_true", help="each tile's forward without its stores, and without its epilogue")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    triton.set_allocator(MK._scratch)  # lmcore.mlp_kernel's TMA kernel builds its descriptors on the device
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, tokens {args.tokens}")
    out = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "checks": [], "ms": {}}
    for tile in tiles:
        for tokens in (1000, 2880, args.tokens):  # one tile a program, two or three (a row tail), record
            r = check(tokens, tile)
            out["checks"].append({"tile": list(tile), **r})
            print("check", "x".join(map(str, tile)), " ".join(f"{k}={v:.3g}" for k, v in r.items()), flush=True)
            if args.sign and not forward_only(tile):
                r = check_sign(tokens, tile)
                out["checks"].append({"tile": list(tile), **r})
                print("check sign", "x".join(map(str, tile)), " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                      flush=True)
            if args.probe and not forward_only(tile):  # probe 3 writes what the kernel writes
                xw = inputs(tokens)[:2]
                (pre, post), (pre3, post3) = pingpong_fwd(*xw, tile), pingpong_fwd(*xw, tile, 3)
                r = {"tokens": tokens, "probe3_pre_vs_plain": rel(pre3, pre), "probe3_post_vs_plain": rel(post3, post)}
                out["checks"].append({"tile": list(tile), **r})
                print("check probe 3", "x".join(map(str, tile)), " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                      flush=True)
            if args.zero and not forward_only(tile):
                r = check_zero(tokens, tile)
                out["checks"].append({"tile": list(tile), **r})
                print("check zero", "x".join(map(str, tile)), " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                      flush=True)
    x, w, wp, g = inputs(args.tokens)
    wp_nk = wp.t().contiguous()
    pre = MK._fc_math(x, w, SLOPE)[0]
    acc = torch.empty(accumulator_floats(args.tokens), device="cuda") if args.zero else None
    rows = {
        "cuBLAS GEMM alone": (lambda: x @ w.t(), lambda: g @ wp),
        "lmcore TMA kernel (default)": (lambda: MK._fc_triton(x, w, SLOPE), lambda: MK._dpre_triton(g, wp, pre, SLOPE)),
    }
    for tile in tiles:
        name = "ping-pong " + "x".join(map(str, tile))
        if forward_only(tile):  # the forward and its probes 1 and 2, no backward
            rows[name] = (lambda t=tile: pingpong_fwd(x, w, t), None)
            if args.probe:
                rows[f"{name}, forward without its TMA stores"] = (lambda t=tile: pingpong_fwd(x, w, t, 1), None)
                rows[f"{name}, forward GEMM alone, no epilogue"] = (lambda t=tile: pingpong_fwd(x, w, t, 2), None)
            continue
        rows[name] = (lambda t=tile: pingpong_fwd(x, w, t), lambda t=tile: pingpong_bwd(g, wp_nk, pre, t))
        # the backward as training ran it until session 25 (w_proj transposed a call), and as it runs now
        rows[name + ", bwd with w_proj.t().contiguous()"] = (
            lambda t=tile: pingpong_fwd(x, w, t), lambda t=tile: pingpong_bwd(g, wp.t().contiguous(), pre, t))
        rows[name + ", bwd B as (K, N)"] = (lambda t=tile: pingpong_fwd(x, w, t),
                                            lambda t=tile: pingpong_bwd(g, wp, pre, t, b_kn=True))
        if args.sign:  # bwd from post and the signs (made once, outside the timing), B as (K, N) as training runs it
            signs, post = pingpong_fwd_sign(x, w, tile)
            rows[name + ", sign"] = (lambda t=tile: pingpong_fwd_sign(x, w, t),
                                     lambda t=tile, p=post, s=signs: pingpong_bwd(g, wp, p, t, b_kn=True, signs=s))
        if args.probe:  # the forward's parts (launch's probes); the plain backward beside them
            for probe, what in ((1, "forward without its TMA stores"), (2, "forward GEMM alone, no epilogue"),
                                (3, "forward storing from registers")):
                rows[f"{name}, {what}"] = (lambda t=tile, pr=probe: pingpong_fwd(x, w, t, pr),
                                           lambda t=tile: pingpong_bwd(g, wp, pre, t, b_kn=True))
        if args.zero:  # the backward zeroing the accumulator as it runs in training (B as (K, N))
            rows[name + ", bwd B as (K, N), zero"] = (
                lambda t=tile: pingpong_fwd(x, w, t), lambda t=tile: pingpong_bwd(g, wp, pre, t, b_kn=True, zero=acc))
    if args.zero:
        rows["the accumulator's zero_() alone (both columns)"] = (acc.zero_, acc.zero_)
    if args.sign:
        tsigns, tpost = MK._fc_triton(x, w, SLOPE, sign=True)
        rows["lmcore TMA kernel, sign"] = (lambda: MK._fc_triton(x, w, SLOPE, sign=True),
                                           lambda: MK._dpre_triton(g, wp, tpost, SLOPE, signs=tsigns))
    print("\n| kernel | forward ms | backward ms |\n|---|---|---|")
    for name, (f, b) in rows.items():
        fwd, bwd = out["ms"][name] = [timed(f), timed(b) if b else None]
        print(f"| {name} | {fwd:.3f} | {'-' if bwd is None else f'{bwd:.3f}'} |", flush=True)
    base = sum(out["ms"]["lmcore TMA kernel (default)"])
    for name, ms in out["ms"].items():
        default = out["ms"].get("ping-pong " + "x".join(map(str, PP.TILE)))
        if name.startswith("ping-pong") and "," not in name and ms[1] is None and default:  # a forward-only tile
            print(f"{name}: {CALLS_PER_STEP * (default[0] - ms[0]):+.1f} ms a step saved in the forward over TILE's")
        elif name.startswith("ping-pong") and "," not in name:
            print(f"{name}: {CALLS_PER_STEP * (base - sum(ms)):+.1f} ms a step saved over the TMA kernel")
        if name.startswith("ping-pong") and name.endswith(", sign"):  # against the same tile's B-as-(K, N) rows
            plain = out["ms"][name.removesuffix(", sign") + ", bwd B as (K, N)"]
            print(f"{name}: {CALLS_PER_STEP * (plain[0] - ms[0]):+.1f} ms forward, "
                  f"{CALLS_PER_STEP * (plain[1] - ms[1]):+.1f} ms backward a step saved over the plain epilogues")
        if name.startswith("ping-pong") and name.endswith(", zero"):
            plain = out["ms"][name.removesuffix(", zero")][1]
            alone = out["ms"]["the accumulator's zero_() alone (both columns)"][1]
            print(f"{name}: the side job costs {CALLS_PER_STEP * (ms[1] - plain):+.2f} ms a step in the backward; the "
                  f"zero_() it replaces {CALLS_PER_STEP * alone:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
