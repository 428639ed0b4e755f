"""Patch FlashAttention-3's hopper/setup.py for an offline build (used by build_fa3.sh).

usage: python3 scripts/fa3_setup_patch.py HOPPER_DIR/setup.py

Each patch must find its anchor at the pinned flash-attention commit; a missing anchor
stops the build with the anchor named, rather than building something else.
"""

from __future__ import annotations

import sys

PATCHES = [
    # The staged tree is no git checkout: don't try to init the cutlass submodule (network).
    (
        'subprocess.run(["git", "submodule", "update", "--init", "../csrc/cutlass"])',
        "pass  # build_fa3.sh: cutlass headers staged offline",
    ),
    # wheel.bdist_wheel is only a deprecated alias in recent wheel releases.
    (
        "from wheel.bdist_wheel import bdist_wheel as _bdist_wheel",
        (
            "try:\n    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel\n"
            "except ImportError:\n    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel"
        ),
    ),
]


def apply(path: str, patches: list[tuple[str, str]], tool: str) -> int:
    """Replace each anchor of `patches` in `path`; 1 (the anchor named) if one is missing."""
    with open(path) as f:
        src = f.read()
    for old, new in patches:
        if src.count(old) != 1:
            print(f"{tool}: anchor found {src.count(old)} times (not once) in {path}: {old!r}", file=sys.stderr)
            return 1
        src = src.replace(old, new)
    with open(path, "w") as f:
        f.write(src)
    return 0


def main(path: str) -> int:
    return apply(path, PATCHES, "fa3_setup_patch")

if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
