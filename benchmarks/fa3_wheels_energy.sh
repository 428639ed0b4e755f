#!/usr/bin/env bash
# Prebuilt FA3 wheels against a base wheel, in joules and bits (issue 16), as ONE device call (about 40 s a wheel on
# nvidia-h200): build the wheels beforehand (build_fa3.sh on any machine with nvcc and torch 2.9+; FA3's stable-ABI
# wheel runs on the GPU machine's torch) and carry them in .fa3. For the base, then each wheel, then the base again:
# fa3_digest.py (the base saves; each wheel compares: out, LSE, dq, dk, dv bit for bit or max |diff|) and
# energy_bench.py --attention's rows matching $ROWS (ms and joules a call back to back at the power cap).
# Each step runs under `timeout`, so a wheel whose kernel fails or hangs costs its step, not the call.
# Leaves in $OUT: digest.txt and energy.tgz (energy_<name>.{json,txt}, <name> the wheel's local version less
# lmcore.hd64bf16; one archive, since a device call brings back only so many files: session 37's first call, 8 of 16).
#   BASE=.fa3/bwd/base/flash_attn_3-*.whl WHEELS=".fa3/bwd/a/*.whl .fa3/bwd/b/*.whl" bash benchmarks/fa3_wheels_energy.sh
set -uo pipefail
ROWS=${ROWS:-FA3}
OUT=${OUT:-$PWD/.bench/out}; mkdir -p "$OUT"
E=${FW_ENERGY_DIR:-/tmp/fw_energy}; rm -rf "$E"; mkdir -p "$E"  # the rows' files, tarred into $OUT after each bench
export PYTHONUNBUFFERED=1
stamp() { echo "$(date +%H:%M:%S) $*"; }
name() { local v=${1##*/}; v=${v#flash_attn_3-*+}; v=${v%%-cp*}; v=${v#lmcore.hd64bf16}; echo "${v#.}"; }
install() {  # install WHEEL: into /tmp/fw/<name>, printed
  local dir=/tmp/fw/$(name "$1")
  [ -d "$dir" ] || python3 -m pip install -q --no-index --no-deps --target "$dir" "$1" >&2
  echo "$dir"
}
bench() {  # bench LABEL SITE
  stamp "energy $1"
  PYTHONPATH=$2:$PWD timeout 200 python3 benchmarks/energy_bench.py --attention --rows "$ROWS" \
    --json "$E/energy_$1.json" 2>&1 | tee "$E/energy_$1.txt"
  tar -C "$E" -czf "$OUT/energy.tgz" .  # after each wheel, so a call cut short still brings the rows so far
}
[ -f "${BASE:-}" ] || { echo "fa3_wheels_energy: BASE=${BASE:-} is not a wheel" >&2; exit 2; }
nvidia-smi --query-gpu=name,uuid,power.limit --format=csv,noheader
B=$(name "$BASE"); BSITE=$(install "$BASE")
stamp "digest, base $B"
PYTHONPATH=$BSITE:$PWD timeout 120 python3 benchmarks/fa3_digest.py --save /tmp/fw_base.pt 2>&1 | tee "$OUT/digest.txt"
bench "base" "$BSITE"
for w in ${WHEELS:-}; do
  [ -f "$w" ] || { stamp "no wheel $w"; continue; }
  n=$(name "$w"); site=$(install "$w")
  stamp "digest, $n against the base" | tee -a "$OUT/digest.txt"
  PYTHONPATH=$site:$PWD timeout 120 python3 benchmarks/fa3_digest.py --compare /tmp/fw_base.pt 2>&1 \
    | tee -a "$OUT/digest.txt"
  bench "$n" "$site"
done
bench "base_after" "$BSITE"
stamp done
