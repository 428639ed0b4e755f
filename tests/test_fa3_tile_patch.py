"""scripts/fa3_tile_patch.py (build_fa3.sh FA3_FWD64_CAUSAL_TILE) and benchmarks/fa3_digest.py's comparison, on CPU.

The patch is applied to ../shared/fa3's pinned sources and the patched `tile_size_fwd_sm90` is compiled with the
host's C++ compiler and run: the causal forward's tile at head dim 64 is the one asked for, the non-causal one and
the other head dims are FA3's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import fa3_digest  # noqa: E402  (benchmarks/, not a package)
import fa3_tile_patch as TP  # noqa: E402  (scripts/, not a package)

PROBE = """#include <initializer_list>
#include "tile_size.h"
#include <cstdio>
int main() {
    for (int d : {64, 128})
        for (int causal = 0; causal < 2; ++causal) {
            auto t = tile_size_fwd_sm90(d, d, causal, false);
            std::printf("%d %d %d %d %d %d\\n", d, causal, std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t));
        }
}
"""


@pytest.mark.parametrize("text, error", [("128", "expected MxN"), ("96x128", "M must be"), ("128x72", "N must be"),
                                         ("128x208", "N must be"), ("x128", "expected MxN")])
def test_parse_tile_names_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        TP.parse_tile(text)
    assert TP.parse_tile("128x128") == (128, 128) and TP.parse_tile("64x192") == (64, 192)


def _tiles(hopper: Path, tmp_path: Path) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    src = tmp_path / "probe.cpp"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    subprocess.run([shutil.which("g++"), "-std=c++17", f"-I{hopper}", str(src), "-o", str(exe)], check=True)
    rows = [tuple(map(int, line.split())) for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                                      text=True).stdout.splitlines()]
    return {(r[0], r[1]): r[2:] for r in rows}


def test_the_tile_patch_changes_the_causal_head_dim_64_tile_only(shared_dir, tmp_path):
    tar = shared_dir / "fa3" / "fa3-src.tar.xz"
    if not tar.is_file():
        pytest.skip(f"{tar} is not present")
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    subprocess.run(["tar", "-xJf", str(tar), "-C", str(tmp_path), "fa/hopper/tile_size.h"], check=True)
    hopper = tmp_path / "fa" / "hopper"
    before = _tiles(hopper, tmp_path)
    assert before[(64, 1)] == (192, 128, 1, 1) and before[(64, 0)] == (192, 192, 0, 1)  # FA3's, at the pin
    assert TP.main(str(hopper), "128x128") == 0
    after = _tiles(hopper, tmp_path)
    assert after[(64, 1)] == (128, 128, 1, 1)
    assert {k: v for k, v in after.items() if k != (64, 1)} == {k: v for k, v in before.items() if k != (64, 1)}
    assert TP.main(str(hopper), "128x128") == 1  # the anchor is gone: a second patch is refused
    assert TP.main(str(hopper), "100x128") == 2


def test_fa3_digest_differences_tell_bits_from_values():
    a = {n: torch.arange(6, dtype=torch.float32).reshape(2, 3) for n in fa3_digest.NAMES}
    b = {n: t.clone() for n, t in a.items()}
    b["dq"][1, 2] += 0.25
    d = fa3_digest.differences(a, b)
    assert d["dq"] == (0.25, False)
    assert all(d[n] == (0.0, True) for n in fa3_digest.NAMES if n != "dq")
