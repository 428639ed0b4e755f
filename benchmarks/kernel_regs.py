"""lmcore.kernels' and lmcore.xsa_kernel's Triton kernels compiled for sm_90 (H100/H200) without a GPU: registers a
thread, spills, barriers (layout conversions through shared memory) and resident warps an
SM, for a few (rows a program, warps) choices at `record`'s shapes: q and k for the q/k
kernels (k also as train.fused_qkv runs it: reading its slice of the q/k/v GEMM's output and
moving v's rows, and with train.fused_qkv_repeat_v repeating them and summing their copies'
gradients, at expand_kv's 2 copies; q's backward from FA3's dQ accumulator, train.fa3_dq_accum),
a gated layer and one without the gate for the XSA kernels. Then
lmcore.mlp_kernel's persistent TMA GEMM (descriptors built by the host, and on the device) at its
tile, each way, at 3 and 4 stages, with and without train.fused_mlp_sign: shared memory against
the card's 232,448 bytes, registers, spills, and the global scratch the device-built descriptors
need; and lmcore.mlp_pingpong's warp-specialized kernel, with and without the sign path, and its backward
zeroing FA3's dQ accumulator (train.mlp_zeroes_dq_accum) (shared memory, registers at launch).
Needs triton (its ptxas does the register allocation); no CUDA. What it cannot tell is time: that is benchmarks/qk_kernel_bench.py's,
xsa_kernel_bench.py's and mlp_epilogue_bench.py's, on the GPU.

usage: python benchmarks/kernel_regs.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmcore import kernels, xsa_kernel
from lmcore import mlp_kernel as MK
from lmcore.config import preset

FWD_ARGS = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "gain_ptr": "*fp32", "out_ptr": "*bf16",
            "rstd_ptr": "*fp32", "v_ptr": "*bf16", "v_out_ptr": "*bf16", "v_rep_ptr": "*bf16", "vs_ptr": "*fp32",
            "n_rows": "i32", "eps": "fp32"}
BWD_ARGS = {"g_ptr": "*bf16", "x_ptr": "*bf16", "rstd_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "gain_ptr": "*fp32", "dx_ptr": "*bf16", "dgain_part_ptr": "*fp32", "gv_ptr": "*bf16", "gv_rep_ptr": "*bf16",
            "dv_ptr": "*bf16", "v_ptr": "*bf16", "vs_ptr": "*fp32", "dvs_part_ptr": "*fp32", "n_rows": "i32"}
CHOICES = [(16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]  # (rows a program, warps); lmcore.kernels uses TILE // D, WARPS
XSA_FWD_ARGS = {"y_ptr": "*bf16", "v_ptr": "*bf16", "z_ptr": "*bf16", "out_ptr": "*bf16", "n_rows": "i32", "eps": "fp32"}
XSA_BWD_ARGS = {"g_ptr": "*bf16", "y_ptr": "*bf16", "v_ptr": "*bf16", "z_ptr": "*bf16", "dy_ptr": "*bf16",
                "dv_ptr": "*bf16", "dz_ptr": "*bf16", "ds_ptr": "*fp32", "n_rows": "i32", "eps": "fp32", "T": "i32",
                "TR": "i32", "HKV": "i32"}
XSA_CHOICES = [(8, 4), (16, 4), (16, 8), (32, 8)]  # lmcore.xsa_kernel uses XSA_TILE // (G * D), XSA_WARPS
# q's backward from FA3's dQ accumulator (train.fa3_dq_accum): 64 rows a program, warps chosen here
ACC_ARGS = {"acc_ptr": "*fp32", "x_ptr": "*bf16", "rstd_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "gain_ptr": "*fp32", "dx_ptr": "*bf16", "dgain_part_ptr": "*fp32", "acc_scale": "fp32"}
ACC_WARPS = [4, 8, 16]


def ptxas() -> str:
    """Triton's newest bundled ptxas (it must read the PTX version Triton writes)."""
    found = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))
    if not found:
        sys.exit("triton has no bundled ptxas here")
    return str(found[-1])


def compiled_for_sm90(fn, args: dict, consts: dict, warps: int, tool: str, stages: int | None = None):
    """(the compiled kernel, registers a thread, spill bytes) of fn for sm_90a."""
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # the forward takes no DXS
    sig = dict(args, **{k: "constexpr" for k in consts})
    # the pointers 16-byte aligned, as Triton's launcher specializes them for torch's allocations
    # (without it every load and store would compile to 2-byte scalars)
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(args.values()) if kind.startswith("*")}
    options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([tool, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    return compiled, regs, re.search(r"(\d+) bytes spill stores", info).group(1)


def registers(fn, args: dict, consts: dict, warps: int, tool: str) -> tuple[int, str, int]:
    compiled, regs, spills = compiled_for_sm90(fn, args, consts, warps, tool)
    return regs, spills, compiled.asm["ptx"].count("bar.sync")


SHARED_LIMIT = 232_448  # bytes of shared memory a block may use on sm_90


def mlp_rows(tool: str) -> None:
    """lmcore.mlp_kernel's TMA kernels at its tile (record's MLP: 512 -> 1536), each way, 3 and 4 stages."""
    bm, bn, bk, warps = MK.TILE_TMA_FWD[:4]
    half = f"bf16[{bm}, {bn // 2}]"
    host = {"a_desc": f"tensordesc<bf16[{bm}, {bk}]>", "b_desc": f"tensordesc<bf16[{bn}, {bk}]>",
            "pre_desc": f"tensordesc<{half}>", "out_desc": f"tensordesc<{half}>", "sign_ptr": "*i32"}
    dev = {"a_ptr": "*bf16", "b_ptr": "*bf16", "pre_ptr": "*bf16", "out_ptr": "*bf16", "sign_ptr": "*i32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "slope": "fp32"}
    print()
    print(f"| lmcore.mlp_kernel, tile {bm}x{bn}x{bk}, {warps} warps | stages | descriptors | shared bytes | fits | "
          "registers | spill bytes | global scratch bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for sign in (False, True):  # train.fused_mlp_sign's kernels: pre's signs kept instead of pre
        for backward in (False, True):
            lmcore_stages = (MK.TILE_TMA_BWD if backward else MK.TILE_TMA_FWD)[4]
            for stages in (3, 4):
                for where, fn, args in (("host", MK._mm_act_tma_kernel, host), ("device", MK._mm_act_tma_dev_kernel, dev)):
                    consts = {"BACKWARD": backward, "SIGN": sign, "BM": bm, "BN": bn, "BK": bk, "SMS": 132}  # H200's SMs
                    c, regs, spills = compiled_for_sm90(fn, dict(args, **scalars), consts, warps, tool, stages)
                    mark = " (lmcore)" if stages == lmcore_stages else ""
                    way = ("backward" if backward else "forward") + (", sign" if sign else "")
                    print(f"| {way} | {stages}{mark} | {where} | {c.metadata.shared:,} | "
                          f"{'yes' if c.metadata.shared <= SHARED_LIMIT else 'no'} | {regs} | {spills} | "
                          f"{getattr(c.metadata, 'global_scratch_size', 0)} |")


def pingpong_rows(tool: str) -> None:
    """lmcore.mlp_pingpong's warp-specialized kernel (train.fused_mlp_pingpong) at a few tiles, each way:
    shared memory, and the registers ptxas gives a thread at launch (the partitions then move them
    with setmaxnreg: 24 for the loader, REGS and the rest for the consumers)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon import language as gl

    from lmcore import mlp_pingpong as PP

    print()
    print("| lmcore.mlp_pingpong | tile (BM x BN x BK, stages, consumer registers, consumers) | shared bytes | fits | "
          "registers at launch | spill bytes |")
    print("|---|---|---|---|---|---|")
    tiles = [(PP.TILE, False), ((128, 128, 64, 4, 232, 2), False), ((128, 128, 64, 4, 232, 1), False),
             ((64, 256, 64, 4, 232, 2), False), (PP.TILE, True)]  # True: train.fused_mlp_sign's (pre's signs)
    more = {False: [PP.TILE_QUARTER], True: []}  # the forward's epilogue by quarter tiles at 6 stages
    for backward in (False, True):
        # and the backward with train.mlp_zeroes_dq_accum's side job (zeros over FA3's dQ accumulator)
        for tile, sign, zero in ([(t, s, False) for t, s in tiles] + [(t, False, False) for t in more[backward]]
                                 + [(PP.TILE, False, True)] * backward):
            bm, bn, bk, stages, regs, consumers, parts = (*tile, 2)[:7]
            # the backward takes w_proj as stored, (K, N) (B_KN)
            descs = [f"tensordesc<bf16[{b[0]}, {b[1]}],{lay!r}>"
                     for b, lay in PP.layouts(gl.bfloat16, bm, bn, bk, backward, parts)]
            sig = {"a_desc": descs[0], "b_desc": descs[1], "pre_desc": descs[2], "out_desc": descs[2],
                   "sign_ptr": "*i32", "pre_ptr": "*bf16", "out_ptr": "*bf16", "zero_ptr": "*fp32", "zero_n": "i32",
                   "M": "i32", "N": "i32", "K": "i32", "slope": "fp32"}
            consts = {"BACKWARD": backward, "SIGN": sign, "ZERO": zero, "PROBE": 0, "STAGES": stages, "SMS": 132, "REGS": regs,
                      "CONSUMERS": consumers, "B_KN": backward, "PARTS": parts}
            src = GluonASTSource(fn=PP._pingpong_kernel, signature=dict(sig, **{k: "constexpr" for k in consts}),
                                 constexprs=consts, attrs={})
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": PP.MAXNREG})
            with tempfile.TemporaryDirectory() as d:
                ptx = Path(d) / "k.ptx"
                ptx.write_text(c.asm["ptx"])
                info = subprocess.run([tool, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "k.cubin")],
                                      capture_output=True, text=True, check=True).stderr
            mark = " (lmcore)" if tile == PP.TILE else ""
            used = re.search(r"Used (\d+) registers", info).group(1)
            spills = re.search(r"(\d+) bytes spill stores", info).group(1)
            way = ("backward" if backward else "forward") + (", sign" if sign else "") + (", zero" if zero else "")
            way += ", quarter tiles" if parts == 4 else ""
            print(f"| {way} | {'x'.join(map(str, tile[:3]))}, {stages}, {regs}, "
                  f"{consumers}{mark} | {c.metadata.shared:,} | {'yes' if c.metadata.shared <= SHARED_LIMIT else 'no'} | "
                  f"{used} | {spills} |")


def _rows(name: str, rows: int, mark: str, warps: int, fns: list, consts: dict, tool: str) -> None:
    for kname, fn, args in fns:
        regs, spills, bars = registers(fn, args, consts, warps, tool)
        resident = min(64 // warps, 65536 // (regs * 32 * warps)) * warps
        print(f"| {name} | {rows}{mark} | {warps} | {kname} | {regs} | {spills} | {bars} | {resident} |")


def main() -> int:
    tool, m = ptxas(), preset("record").model
    half = (m.rope_dims or m.head_dim) // 2
    print(f"triton {triton.__version__}, {Path(tool).name}, sm_90a; head dim {m.head_dim}, rotated half {half}")
    print()
    print("| tensor | rows a program | warps | kernel | registers | spill bytes | barriers | resident warps an SM |")
    print("|---|---|---|---|---|---|---|---|")
    qk = [("forward", kernels._qk_fwd_kernel, FWD_ARGS), ("backward", kernels._qk_bwd_kernel, BWD_ARGS)]
    qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim  # a token's stride in train.fused_qkv's GEMM output
    g = m.num_heads // m.num_kv_heads
    for name, heads, has_gain, has_v, rep, vs in (
            ("q", m.num_heads, True, False, 1, False), ("k", m.num_kv_heads, False, False, 1, False),
            ("k, fused q/k/v (moves v)", m.num_kv_heads, False, True, 1, False),
            ("k, fused q/k/v, v repeated", m.num_kv_heads, False, True, g, False),
            ("k, fused q/k/v, v repeated and scaled (train.fold_attn_norm)", m.num_kv_heads, False, True, g, True)):
        for rows, warps in CHOICES:  # k: no gain
            xs = qkv if has_v else heads * m.head_dim
            consts = {"T": 2048, "H": heads, "D": m.head_dim, "HALF": half, "R": rows, "HAS_GAIN": has_gain,
                      "REP": rep, "XS": xs, "DXS": xs, "HAS_V": has_v, "V_REP": rep > 1, "HAS_VS": vs}
            mark = " (lmcore)" if rows == kernels.TILE // m.head_dim and warps == kernels.WARPS else ""
            _rows(name, rows, mark, warps, qk, consts, tool)
    xsa = [("forward", xsa_kernel._xsa_fwd_kernel, XSA_FWD_ARGS), ("backward", xsa_kernel._xsa_bwd_kernel, XSA_BWD_ARGS)]
    for name, gated, rowsum in (("XSA, gated", True, False), ("XSA, no gate", False, False),
                                ("XSA, gated, rowsums (train.fa3_xsa_rowsum)", True, True)):
        for rows, warps in XSA_CHOICES:
            consts = {"G": g, "D": m.head_dim, "R": rows, "HAS_GATE": gated, "ROWSUM": rowsum}
            mark = " (lmcore)" if rows == xsa_kernel.XSA_TILE // (g * m.head_dim) and warps == xsa_kernel.XSA_WARPS else ""
            _rows(name, rows, mark, warps, xsa, consts, tool)
    qkv_consts = {"T": 2048, "H": m.num_heads, "D": m.head_dim, "HALF": half, "TR": 2048, "XS": qkv, "DXS": qkv}
    for warps in ACC_WARPS:
        _rows("q from FA3's dQ accumulator (train.fa3_dq_accum)", 64, " (lmcore)" if warps == kernels.WARPS else "",
              warps, [("backward", kernels._q_bwd_acc_kernel, ACC_ARGS)], qkv_consts, tool)
    mlp_rows(tool)
    pingpong_rows(tool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
