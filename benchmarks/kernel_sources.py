"""The generated source of a profiled run's most expensive Triton kernels, out of inductor's cache.

usage: python benchmarks/kernel_sources.py RUN_DIR CACHE_DIR OUT_DIR [N]

RUN_DIR/profile/breakdown.json (train.profile_step) names the step's top kernels; the N
(default 12) most expensive inductor kernels among them (names starting with "triton_") are
looked up in the .py files under CACHE_DIR (TORCHINDUCTOR_CACHE_DIR of that run) and each
file defining one is copied to OUT_DIR, with index.json: {kernel: [ms, calls, file]}. What the
profile says is slow can then be read next to what inductor wrote for it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def kernel_files(names: list[str], cache: Path) -> dict[str, Path]:
    """{name: the cache file whose source defines the kernel `name`} for the names found."""
    found: dict[str, Path] = {}
    for f in sorted(cache.rglob("*.py")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for n in names:
            if n not in found and f"def {n}(" in text:
                found[n] = f
    return found


def main(run: Path, cache: Path, out: Path, n: int = 12) -> int:
    top = json.loads((run / "profile" / "breakdown.json").read_text())["top"]
    rows = [r for r in top if r["name"].startswith("triton_")][:n]
    files = kernel_files([r["name"] for r in rows], cache)
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for r in rows:
        f = files.get(r["name"])
        if f is not None:
            shutil.copyfile(f, out / f.name)
        index[r["name"]] = [r["ms"], r["calls"], f.name if f is not None else None]
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{sum(v[2] is not None for v in index.values())} of {len(index)} kernels' sources -> {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:])))
