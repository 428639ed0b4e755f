#!/usr/bin/env bash
# FA3's causal forward tile at head dim 64 in joules (issue 16), as ONE device call (about 300 s on nvidia-h200):
# 1. builds FA3 with FA3_FWD64_CAUSAL_TILE=$TILE (scripts/fa3_tile_patch.py; default 128x128) in the background;
# 2. meanwhile, on .fa3/dist's wheel (FA3's own tiles): fa3_digest.py --save, and energy_bench.py's FA3 rows;
# 3. on the patched build: fa3_digest.py --compare (same outputs?), and the same energy rows;
# 4. the stock wheel's energy rows again, after, so the pair is bracketed.
# Session 5 timed this tile at 2% less forward time (kernel sums, no power cap); under the cap what counts is the
# joules (benchmarks/RESULTS.md, session 35). Carry .fa3 (a copy of ../shared/fa3: the tarball and dist/).
# Leaves in $OUT: build.log, digest.txt, energy_{stock,tile,stock_after}.{json,txt}.
#   TILE=128x128 ROWS='FA3|q/k/v' bash benchmarks/fa3_tile_energy.sh
set -uo pipefail
TILE=${TILE:-128x128}
ROWS=${ROWS:-FA3}
OUT=${OUT:-$PWD/.bench/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp() { echo "$(date +%H:%M:%S) $*"; }
nvidia-smi --query-gpu=name,uuid,power.limit --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3 .fa3/dist/*.whl
(FA3_FWD64_CAUSAL_TILE=$TILE MAX_JOBS=$(nproc) timeout 400 bash scripts/build_fa3.sh /tmp/fa3tile/wheel \
  > "$OUT/build.log" 2>&1; echo "rc $?" >> "$OUT/build.log") &
BUILD=$!
bench() {  # bench NAME SITE: the energy rows on the FA3 installed in SITE
  stamp "energy $1"
  PYTHONPATH=$2:$PWD timeout 200 python3 benchmarks/energy_bench.py --attention --rows "$ROWS" \
    --json "$OUT/energy_$1.json" 2>&1 | tee "$OUT/energy_$1.txt"
}
stamp "digest, stock"
PYTHONPATH=/tmp/fa3:$PWD timeout 120 python3 benchmarks/fa3_digest.py --save /tmp/stock.pt 2>&1 | tee "$OUT/digest.txt"
bench stock /tmp/fa3
stamp "waiting for the build"
wait $BUILD
tail -25 "$OUT/build.log"
grep -q "^rc 0" "$OUT/build.log" || { stamp "build failed"; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3tile/site /tmp/fa3tile/wheel/flash_attn_3-*.whl
stamp "digest, tile $TILE"
PYTHONPATH=/tmp/fa3tile/site:$PWD timeout 120 python3 benchmarks/fa3_digest.py --compare /tmp/stock.pt 2>&1 \
  | tee -a "$OUT/digest.txt"
bench tile /tmp/fa3tile/site
bench stock_after /tmp/fa3
stamp done
