"""Is the LeakyReLU^2 worth fusing into the MLP's GEMMs (#1105's route) with torch 2.11's inductor?
At `record`'s micro-batch, the MLP forward's first half, act(X W_fc^T), and the backward's
dH = (dY W_proj) * act'(H), each compiled three ways:

  default       cuBLAS GEMM, then inductor's elementwise kernel (what lmcore trains with)
  autotune      mode max-autotune-no-cudagraphs: inductor's Triton GEMM templates, which carry
                the elementwise work as an epilogue, benchmarked against cuBLAS
  autotune+tma  the same with triton.enable_persistent_tma_matmul (Hopper's persistent TMA
                templates among the choices)
  lmcore TILE   lmcore.mlp_kernel's Triton GEMM (train.fused_mlp) at one tile (--tiles): the forward
                also writes pre, which training keeps for the backward (the rows above do not)

usage: python benchmarks/mlp_epilogue_bench.py [--tokens 98304] [--hows default,autotune,autotune+tma]
       [--tiles BMxBNxBKxWARPSxSTAGES,...] [--sign] [--host] [--json PATH]

--sign adds a row a tile with train.fused_mlp_sign's kernels: the forward writes post and pre's
signs (not pre), the backward reads post and the signs.

--host adds the host's time a call (128 tokens, so that the GPU waits for the host): the Triton
GEMM at each tile, the whole op `leaky_mlp` forward, and cuBLAS's matmul for scale.

GPU only. Times are fp8_matmul_bench.timed's (10 calls in a row, median of 20) after the
compile and 5 warm-ups; "GEMM alone" is cuBLAS's matmul without the elementwise work, the
floor a fused kernel must reach.
A step of `record` makes 88 calls of each (11 layers x 8 micro-batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from fp8_matmul_bench import timed  # this folder: CUDA-event median timing, shared

import lmcore.mlp_kernel as MK

SLOPE = 0.5  # record's leaky_slope
CALLS_PER_STEP = 11 * 8


def fwd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x @ w.t(), negative_slope=SLOPE).square()


def bwd(dy: torch.Tensor, wp: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    a = F.leaky_relu(h, negative_slope=SLOPE)
    return (dy @ wp) * (2 * a * torch.where(h > 0, 1.0, SLOPE)).to(h.dtype)


def compiled(fn, how: str):
    torch._dynamo.reset()
    if how == "default":
        return torch.compile(fn)
    options = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))
    if how == "autotune+tma":
        options["triton.enable_persistent_tma_matmul"] = True
    return torch.compile(fn, options=options)


def _lmcore(name: str, tile: tuple, sign: bool = False):
    """lmcore.mlp_kernel's Triton GEMM at `tile` as fwd's or bwd's signature (fwd returns post);
    with `sign`, train.fused_mlp_sign's kernels (bwd's post and signs made from h, outside the timing)."""
    if name == "fwd":
        return lambda x, w: MK._fc_triton(x, w, SLOPE, tile, sign=sign)[1]
    if not sign:
        return lambda dy, wp, h: MK._dpre_triton(dy, wp, h, SLOPE, tile)
    kept = {}

    def bwd_sign(dy, wp, h):
        if "post" not in kept:
            kept["post"], kept["signs"] = MK._act(h, SLOPE), MK._pack(h > 0)
        return MK._dpre_triton(dy, wp, kept["post"], SLOPE, tile, signs=kept["signs"])
    return bwd_sign


def host_us(fn, calls: int = 2000) -> float:
    """The host's microseconds a call: `calls` calls back to back on tiny inputs, timed on the host
    clock after a synchronize on each side (the median of 5 such loops)."""
    out = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out[1:])


def host_table(tiles: dict) -> dict:
    """host_us of the Triton GEMM at each tile (forward and backward), the op, and a matmul."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x, dy = (torch.randn(128, 512, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    w = torch.randn(1536, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    wp = torch.randn(512, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    h = x @ w.t()
    rows = {"cuBLAS matmul": host_us(lambda: x @ w.t()),
            "leaky_mlp op forward (default tiles)": host_us(lambda: MK.leaky_mlp(x, w, wp, SLOPE))}
    tma, MK.TensorDescriptor = MK.TensorDescriptor, None  # the pointer kernel's tiles by default
    rows["leaky_mlp op forward (pointer kernel)"] = host_us(lambda: MK.leaky_mlp(x, w, wp, SLOPE))
    MK.TensorDescriptor = tma
    for how, tile in tiles.items():
        for name, fn in (("fwd", lambda tile=tile: MK._fc_triton(x, w, SLOPE, tile)),
                         ("bwd", lambda tile=tile: MK._dpre_triton(dy, wp, h, SLOPE, tile))):
            try:
                rows[f"{how} {name}"] = host_us(fn)
            except Exception as e:  # noqa: BLE001 (a tile that does not fit one direction: its error is the row)
                rows[f"{how} {name}"] = f"{type(e).__name__}"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48 * 2048)
    ap.add_argument("--hows", default="default,autotune,autotune+tma", help="torch.compile ways, comma-separated")
    ap.add_argument("--tiles", default="", help="lmcore.mlp_kernel tiles BMxBNxBKxWARPSxSTAGES, comma-separated")
    ap.add_argument("--sign", action="store_true", help="each tile also with train.fused_mlp_sign's kernels")
    ap.add_argument("--host", action="store_true", help="also the host's time a call (128 tokens)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    M, D, Hd = args.tokens, 512, 1536
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(Hd, D, device="cuda", dtype=torch.bfloat16, generator=g) / D**0.5
    wp = torch.randn(D, Hd, device="cuda", dtype=torch.bfloat16, generator=g) / Hd**0.5
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, generator=g)
    h = x @ w.t()
    ref_f, ref_b = fwd(x, w).float(), bwd(dy, wp, h).float()
    rows = {"GEMM alone": {"fwd": timed(lambda: x @ w.t()), "bwd": timed(lambda: dy @ wp)}}
    tiles = {f"lmcore {t}": tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t}
    signs = {f"{how} sign": tile for how, tile in tiles.items()} if args.sign else {}
    for how in [*args.hows.split(","), *tiles, *signs]:
        row = {}
        for name, fn, inputs, ref in (("fwd", fwd, (x, w), ref_f), ("bwd", bwd, (dy, wp, h), ref_b)):
            try:
                if how in tiles or how in signs:
                    c = _lmcore(name, tiles.get(how) or signs[how], how in signs)
                else:
                    c = compiled(fn, how)
                out = c(*inputs).float()
                row[name] = timed(lambda c=c, inputs=inputs: c(*inputs))
                row[name + "_rel_err"] = ((out - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001 (a mode torch cannot compile here is a result, not a crash)
                row[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows[how] = row
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {M} tokens a call, {D} -> {Hd} -> {D}; "
          "ms a call (median of 20)")
    print()
    print("| how | fwd: act(X W_fc^T) | bwd: (dY W_proj) * act'(H) | a step's 88 calls of both |")
    print("|---|---|---|---|")
    for how, r in rows.items():
        f, b = r.get("fwd"), r.get("bwd")
        step = f"{CALLS_PER_STEP * (f + b):.1f} ms" if f and b else "-"
        print(f"| {how} | {f'{f:.3f}' if f else r.get('fwd_error', '-')} | {f'{b:.3f}' if b else r.get('bwd_error', '-')} | {step} |")
    host = host_table(tiles) if args.host else {}  # the pre kernels' host time (the sign ones launch alike)
    if host:
        print()
        print("| host's time a call, 128 tokens | us |")
        print("|---|---|")
        for how, us in host.items():
            print(f"| {how} | {us if isinstance(us, str) else f'{us:.1f}'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": M, "rows": rows,
                       "host_us": host}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
