"""Patch FlashAttention-3's causal backward configuration at head dim 64 (build_fa3.sh FA3_BWD64_CAUSAL=SPEC).

usage: python3 scripts/fa3_bwd_patch.py HOPPER_DIR SPEC        e.g. SPEC = atomdq=1,dprs=1

FA3 launches its sm90 backward at head dim 64 (without softcap) with one set of template arguments for causal and
non-causal attention (hopper/flash_bwd_launch_template.h, `run_mha_bwd_hdim64`): 128 x 128 tiles, two stages of
dO and of dS, S and dP computed transposed (SdP_swapAB), two consumer warpgroups that split dK/dV's and dQ's
N and M between them, dP's GEMM reading dO from shared memory. FA3 has no alternative for this case on record;
session 5 measured a 96 x 128 tile 17% slower. This patch gives the causal case its own arguments, the defaults
being FA3's, and leaves the non-causal one as it is. SPEC names the ones that differ, key=value, comma-separated:

  m, n          the tile (64, 96 or 128; default 128, 128)
  stagesdo      stages of dO (1 or 2; 2)                  stagesds   stages of dS (1 or 2; 2)
  sdpswap       S and dP transposed (0 or 1; 1)           dkvswap    dK and dV transposed (0 or 1; 0)
  dqswap        dQ transposed (0 or 1; 0)
  atomsdp, atomdkv, atomdq   warpgroups along M for S/dP, along N for dK/dV, along M for dQ (1 or 2; 1, 2, 2)
  dprs          dP's GEMM with dO from registers (0 or 1; 0; needs sdpswap=1)

The checks are FA3's own static assertions (mainloop_bwd_sm90_tma_gmma_ws.hpp); a combination that passes them can
still fail to compile or spill (the build's log says). The anchor must occur exactly once at the pinned commit.
`tag(SPEC)` is the wheel's local-version suffix (build_fa3.sh: .bwd<key><value>...).
"""

from __future__ import annotations

import os
import sys

from fa3_setup_patch import apply

# FA3's arguments at the pin, in run_mha_bwd_dispatch's order after <Arch, T, kBlockM, kBlockN, kHeadDim, Is_causal,
# Is_local, Has_softcap>: Stages_dO, Stages_dS, SdP_swapAB, dKV_swapAB, dQ_swapAB, NumMmaWarpGroups, AtomLayoutMSdP,
# AtomLayoutNdKV, AtomLayoutMdQ, Mma_dP_is_RS.
DEFAULTS = {"m": 128, "n": 128, "stagesdo": 2, "stagesds": 2, "sdpswap": 1, "dkvswap": 0, "dqswap": 0,
            "atomsdp": 1, "atomdkv": 2, "atomdq": 2, "dprs": 0}
# stagesdo at most Q's 2 stages (FA3: kStages >= kStages_dO); the flags 0 or 1
CHOICES = {"m": (64, 96, 128), "n": (64, 96, 128), "stagesdo": (1, 2), "stagesds": (1, 2),
           "atomsdp": (1, 2), "atomdkv": (1, 2), "atomdq": (1, 2)}
CALL = ("run_mha_bwd_dispatch<Arch, T, {m}, {n}, 64, Is_causal, Is_local, Has_softcap, {stagesdo}, {stagesds}, "
        "{sdpswap}, {dkvswap}, {dqswap}, 2, {atomsdp}, {atomdkv}, {atomdq}, {dprs}>(params, stream);")


def _cxx(args: dict[str, int]) -> dict[str, str]:
    flags = ("sdpswap", "dkvswap", "dqswap", "dprs")
    return {k: ("true" if v else "false") if k in flags else str(v) for k, v in args.items()}


FA3_CALL = CALL.format(**_cxx(DEFAULTS))
# the comment above FA3's call is part of the anchor, so that a patched file has no anchor left
COMMENT = "// With ShuffleStats we no longer have register spilling when Has_softcap and using 128 x 128 block.\n"
ANCHOR = f"                {COMMENT}                {FA3_CALL}"


def parse_spec(spec: str) -> dict[str, int]:
    """The full argument set of SPEC over FA3's defaults, or ValueError naming the key or value that is wrong."""
    args = dict(DEFAULTS)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"{item!r}: expected key=value with key one of {', '.join(DEFAULTS)}")
        choices = CHOICES.get(key, (0, 1))
        if not value.isdigit() or int(value) not in choices:
            raise ValueError(f"{key}={value}: expected one of {choices}")
        args[key] = int(value)
    if args["dprs"] and not args["sdpswap"]:
        raise ValueError("dprs=1 needs sdpswap=1 (FA3: !Mma_dP_is_RS || SdP_swapAB)")
    if args == DEFAULTS:
        raise ValueError(f"{spec!r} is FA3's own configuration: nothing to patch")
    return args


def tag(spec: str) -> str:
    """The wheel's local-version suffix for SPEC: 'bwd' and the keys that differ from FA3's, with their values."""
    args = parse_spec(spec)
    return "bwd" + "".join(f"{k}{v}" for k, v in args.items() if v != DEFAULTS[k])


def patches(args: dict[str, int]) -> list[tuple[str, str]]:
    pad = "                "
    return [(ANCHOR, f"{pad}if constexpr (Is_causal) {{  // lmcore fa3_bwd_patch\n"
                     f"{pad}    {CALL.format(**_cxx(args))}\n"
                     f"{pad}}} else {{\n{pad}    {COMMENT}{pad}    {FA3_CALL}\n{pad}}}")]


def main(hopper: str, spec: str) -> int:
    try:
        args = parse_spec(spec)
    except ValueError as e:
        print(f"fa3_bwd_patch: {e}", file=sys.stderr)
        return 2
    return apply(os.path.join(hopper, "flash_bwd_launch_template.h"), patches(args), "fa3_bwd_patch")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tag":
        try:
            print(tag(sys.argv[2]))
        except ValueError as e:
            print(f"fa3_bwd_patch: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
