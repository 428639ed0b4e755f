"""scripts/fa3_bwd_patch.py (build_fa3.sh FA3_BWD64_CAUSAL), on CPU.

The patch is applied to ../shared/fa3's pinned flash_bwd_launch_template.h: the causal head-dim-64 backward gets
the arguments asked for, the non-causal one and the softcap one keep FA3's; the spec's checks are FA3's static
assertions; the wheel's tag names what differs. (Compiling the patched kernel needs nvcc and minutes: the device
script's build does that.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import fa3_bwd_patch as BP  # noqa: E402  (scripts/, not a package)

HDIM64 = re.compile(r"run_mha_bwd_dispatch<Arch, T, (\d+), (\d+), 64, Is_causal, Is_local, Has_softcap, ([^>]*)>")


@pytest.mark.parametrize("spec, error", [("atomdq", "expected key=value"), ("tile=64", "expected key=value"),
                                         ("atomdq=3", "expected one of"), ("m=80", "expected one of"),
                                         ("dprs=yes", "expected one of"), ("sdpswap=0,dprs=1", "needs sdpswap=1"),
                                         ("atomdq=2", "FA3's own"), ("", "FA3's own")])
def test_parse_spec_names_what_is_wrong(spec, error):
    with pytest.raises(ValueError, match=error):
        BP.parse_spec(spec)


def test_parse_spec_and_tag():
    args = BP.parse_spec("atomdq=1, dprs=1")
    assert args == {**BP.DEFAULTS, "atomdq": 1, "dprs": 1}
    assert BP.tag("dprs=1,atomdq=1") == "bwdatomdq1dprs1"  # FA3's key order, whatever the spec's
    assert BP.tag("m=64") == "bwdm64"
    assert re.fullmatch(r"[a-z0-9]+", BP.tag("stagesds=1,dqswap=1,atomdkv=1"))  # a valid local-version segment


def _dispatches(path: Path) -> list[tuple[str, str, str]]:
    return HDIM64.findall(path.read_text())


def test_the_patch_changes_the_causal_head_dim_64_backward_only(shared_dir, tmp_path):
    tar = shared_dir / "fa3" / "fa3-src.tar.xz"
    if not tar.is_file():
        pytest.skip(f"{tar} is not present")
    member = "fa/hopper/flash_bwd_launch_template.h"
    subprocess.run(["tar", "-xJf", str(tar), "-C", str(tmp_path), member], check=True)
    path = tmp_path / member
    before = path.read_text()
    fa3 = "2, 2, true, false, false, 2, 1, 2, 2, false"
    # FA3's at the pin: the softcap-causal 96 x 128 and the 128 x 128 for everything else (sm90), then sm80/86/89's
    assert _dispatches(path)[:2] == [("96", "128", "2, 2, true, false, true, 2, 1, 2, 2, false"), ("128", "128", fa3)]
    assert BP.main(str(path.parent), "atomdq=1,dprs=1,n=96") == 0
    after = path.read_text()
    assert _dispatches(path)[:3] == [("96", "128", "2, 2, true, false, true, 2, 1, 2, 2, false"),
                                     ("128", "96", "2, 2, true, false, false, 2, 1, 2, 1, true"), ("128", "128", fa3)]
    # the new call sits under `if constexpr (Is_causal)`, FA3's under its else
    block = after[after.index("if constexpr (Is_causal) {  // lmcore"):]
    assert block.index("128, 96, 64") < block.index("} else {") < block.index("128, 128, 64")
    start = after.index("                if constexpr (Is_causal) {  // lmcore")
    end = after.index("}", after.index("} else {", start) + len("} else {")) + 1
    assert after[:start] + BP.ANCHOR + after[end:] == before  # nothing else changed
    assert BP.main(str(path.parent), "atomdq=1") == 1  # the anchor is gone: a second patch is refused
    assert BP.main(str(path.parent), "atomdq=5") == 2
