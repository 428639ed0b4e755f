"""lmcore.kernels' Triton kernels compiled for sm_90 (H100/H200) without a GPU: registers a
thread, spills and resident warps an SM, for a few (rows a program, warps) choices at
`record`'s q and k shapes. Needs triton (its ptxas does the register allocation); no CUDA.
What it cannot tell is time: that is benchmarks/qk_kernel_bench.py's, on the GPU.

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

from lmcore import kernels
from lmcore.config import preset

FWD_ARGS = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "gain_ptr": "*fp32", "out_ptr": "*bf16",
            "rstd_ptr": "*fp32", "n_rows": "i32", "eps": "fp32"}
BWD_ARGS = {"g_ptr": "*bf16", "x_ptr": "*bf16", "rstd_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "gain_ptr": "*fp32", "dx_ptr": "*bf16", "dgain_part_ptr": "*fp32", "n_rows": "i32"}
CHOICES = [(16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]  # (rows a program, warps); lmcore.kernels uses TILE // D, WARPS


def ptxas() -> str:
    """Triton's newest bundled ptxas (it must read the PTX version Triton writes)."""
    found = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))
    if not found:
        sys.exit("triton has no bundled ptxas here")
    return str(found[-1])


def registers(fn, args: dict, consts: dict, warps: int, tool: str) -> tuple[int, str]:
    sig = dict(args, **{k: "constexpr" for k in consts})
    # the pointers 16-byte aligned, as Triton's launcher specializes them for torch's allocations
    # (without it every load and store would compile to 2-byte scalars)
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(args.values()) if kind.startswith("*")}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([tool, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores", info).group(1)
    return regs, spills


def main() -> int:
    tool, m = ptxas(), preset("record").model
    half = (m.rope_dims or m.head_dim) // 2
    print(f"triton {triton.__version__}, {Path(tool).name}, sm_90a; head dim {m.head_dim}, rotated half {half}")
    print()
    print("| tensor | rows a program | warps | kernel | registers | spill bytes | resident warps an SM |")
    print("|---|---|---|---|---|---|---|")
    for name, heads, has_gain in (("q", m.num_heads, True), ("k", m.num_kv_heads, False)):  # k: no gain
        for rows, warps in CHOICES:
            consts = {"T": 2048, "H": heads, "D": m.head_dim, "HALF": half, "R": rows, "HAS_GAIN": has_gain}
            for kname, fn, args in (("forward", kernels._qk_fwd_kernel, FWD_ARGS),
                                    ("backward", kernels._qk_bwd_kernel, BWD_ARGS)):
                regs, spills = registers(fn, args, consts, warps, tool)
                resident = min(64 // warps, 65536 // (regs * 32 * warps)) * warps
                mark = " (lmcore)" if rows == kernels.TILE // m.head_dim and warps == kernels.WARPS else ""
                print(f"| {name} | {rows}{mark} | {warps} | {kname} | {regs} | {spills} | {resident} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
