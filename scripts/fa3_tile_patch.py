"""Patch FlashAttention-3's forward tile for head dim 64, causal (build_fa3.sh FA3_FWD64_CAUSAL_TILE=MxN).

usage: python3 scripts/fa3_tile_patch.py HOPPER_DIR MxN

At head dim 64 FA3 picks its sm90 forward tile in `tile_size_fwd_sm90` (hopper/tile_size.h): 192 x 128 when
causal (three consumer warpgroups, P kept in registers for the PV GEMM), 192 x 192 otherwise. At `record`'s
sequence of 2,048 a 192-row tile does not divide the sequence (the last of 11 row blocks is two thirds full) and
its diagonal tiles are wider, so about 18% of the causal forward's tiles' work is masked or out of range, against
6% with 128 x 128 tiles (16 row blocks). This patch sets the causal (and local) tile to M x N; MmaPV_is_RS and the
intra-warpgroup overlap stay as FA3 has them, and the non-causal tile is unchanged. Each query row's online
softmax still runs over the same key blocks when N is unchanged (128), so the forward's outputs do not depend on M.

M: 64, 128 or 192 (64 rows a consumer warpgroup); N: a multiple of 16 from 64 to 192. The anchor must occur
exactly once at the pinned flash-attention commit, else the build stops with it named (fa3_setup_patch.apply).
"""

from __future__ import annotations

import os
import re
import sys

from fa3_setup_patch import apply

ANCHOR = "return {192, use_blockN_128 ? 128 : 192, use_blockN_128, true};"


def parse_tile(text: str) -> tuple[int, int]:
    """(M, N) of 'MxN', or ValueError naming what is wrong."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"tile {text!r}: expected MxN, e.g. 128x128")
    rows, cols = int(m.group(1)), int(m.group(2))
    if rows not in (64, 128, 192):
        raise ValueError(f"tile {text!r}: M must be 64, 128 or 192 (64 rows a consumer warpgroup)")
    if cols % 16 or not 64 <= cols <= 192:
        raise ValueError(f"tile {text!r}: N must be a multiple of 16 from 64 to 192")
    return rows, cols


def patches(rows: int, cols: int) -> list[tuple[str, str]]:
    return [(ANCHOR, f"return {{use_blockN_128 ? {rows} : 192, use_blockN_128 ? {cols} : 192, use_blockN_128, true}};"
                     f"  // lmcore fa3_tile_patch: causal {rows} x {cols}")]


def main(hopper: str, tile: str) -> int:
    try:
        rows, cols = parse_tile(tile)
    except ValueError as e:
        print(f"fa3_tile_patch: {e}", file=sys.stderr)
        return 2
    return apply(os.path.join(hopper, "tile_size.h"), patches(rows, cols), "fa3_tile_patch")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
