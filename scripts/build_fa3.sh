#!/usr/bin/env bash
# Build a minimal FlashAttention-3 wheel (module flash_attn_interface + extension
# flash_attn_3._C) for Hopper (sm_90a), offline, from two pinned commits:
#   flash-attention 0251105a2fb19d2957484b7f023cd8c115286ced  (its hopper/ folder)
#   CUTLASS         7127592069c2fe01b041e174ba4345ef9b279671  (its submodule pin, 4.3.4)
# Kernels: bf16, head dim 64 (lmcore's and the record's), forward + backward, causal or not,
# MHA or GQA, deterministic or not. Everything else (fp16, fp8, other head dims, split-KV,
# paged/append KV, softcap, local windows, varlen, sm80 kernels) is switched off with
# hopper/setup.py's own FLASH_ATTENTION_DISABLE_* flags: that is what makes it build in a
# few minutes. The cluster switch stays on (at head dim 64 it adds no kernel).
#
# usage: scripts/build_fa3.sh [OUT_DIR]      (default .fa3/wheel, ignored by git)
#   then: python3 -m pip install OUT_DIR/flash_attn_3-*.whl  (or --target DIR + PYTHONPATH)
#
# Sources, the first that exists:
#   FA3_SRC=DIR      a git checkout of Dao-AILab/flash-attention at the pinned commit with
#                    csrc/cutlass checked out (git submodule update --init csrc/cutlass);
#                    both commits are checked, FA3_ANY_COMMIT=1 builds others anyway
#   FA3_TARBALL=F    fa3-src.tar.xz (fa/hopper, fa/csrc/cutlass/include at the pins),
#                    default .fa3/fa3-src.tar.xz, then ../shared/fa3/fa3-src.tar.xz
# Knobs:
#   FA3_PACKGQA=1    also compile the PackGQA forward kernels (FA3 then decides per call)
#   FA3_PTXAS=PATH   assemble the device code with this ptxas (e.g. CUDA 12.8's, which
#                    upstream prefers) instead of the toolkit's; see scripts/fa3_ptxas.sh
#                    (neither is faster at the record's shape: benchmarks/RESULTS.md)
#   FA3_DPSUM=1      patch the backward to take rowsum(dO * O) from the caller (scripts/fa3_dpsum_patch.py:
#                    bwd's argument `softmax_d`; lmcore's train.fa3_xsa_rowsum needs it; and its flag
#                    `dq_accum_only`, which skips dQ's convert); the wheel's local version ends in .dpsum.
#                    Without the two every kernel runs as before
#   FA3_FWD64_CAUSAL_TILE=MxN  the causal forward's tile at head dim 64 (FA3's is 192x128; scripts/fa3_tile_patch.py);
#                    the wheel's local version ends in .fwdMxN
#   FA3_BWD64_CAUSAL=SPEC  the causal backward's template arguments at head dim 64, key=value over FA3's
#                    (scripts/fa3_bwd_patch.py, e.g. atomdq=1,dprs=1); the wheel's local version ends in .bwd<SPEC>
#   FA3_TAG=NAME    appended to the wheel's local version (3.0.0+lmcore.hd64bf16...NAME), to
#                    tell builds of patched sources apart
#   FA3_WORK (scratch, default /tmp/fa3_build), MAX_JOBS (default nproc), NVCC_THREADS (2),
#   PYTHON (default python3: the interpreter whose torch the wheel is built against),
#   CUDA_HOME (default: /usr/local/cuda, else the toolkit of the nvcc on PATH; CUDA 12.8 or 13+)
# Prints the wheel, its sha256, the commits, toolchain, enabled kernels, per-object
# compile times and register/spill use; the full compiler log is OUT_DIR/fa3_build.log.
set -euo pipefail
FA_PIN=0251105a2fb19d2957484b7f023cd8c115286ced
CUTLASS_PIN=7127592069c2fe01b041e174ba4345ef9b279671
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/.fa3/wheel}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=${FA3_WORK:-/tmp/fa3_build}
PY=$(command -v "${PYTHON:-python3}")
T0=$(date +%s)
say() { echo "[build_fa3 +$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "build_fa3: $*" >&2; exit 1; }

# ---- toolchain: the python whose torch we build against (its bin has ninja), nvcc --------
export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
if [ -z "${CUDA_HOME:-}" ]; then
  NV=$(command -v nvcc || true)
  for c in /usr/local/cuda ${NV:+"$(dirname "$(dirname "$(readlink -f "$NV")")")"}; do
    if [ -x "$c/bin/nvcc" ] && [ -e "$c/include/cuda_runtime.h" ]; then CUDA_HOME=$c; break; fi
  done
  # a wrapper script on PATH (exec .../cuda-13.0/bin/nvcc): ask nvcc where it lives
  if [ -z "${CUDA_HOME:-}" ] && [ -n "$NV" ]; then
    TOP=$("$NV" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [ -n "$TOP" ] && [ -e "$TOP/include/cuda_runtime.h" ] && CUDA_HOME=$(cd "$TOP" && pwd)
  fi
fi
[ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA toolkit (nvcc + headers) not found; set CUDA_HOME"
# FA3's setup.py builds offline with CUDA 12.8 or 13+ only: with another 12.x it fetches nvcc
# 12.6 + ptxas 12.8 from NVIDIA (and, told to stay offline, fails on the missing nvcc)
NVCC_REL=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
case $NVCC_REL in
  12.8 | 1[3-9].* | [2-9][0-9].*) ;;
  *) die "nvcc $NVCC_REL at $CUDA_HOME: an offline FA3 build needs CUDA 12.8 or 13+ (set CUDA_HOME)" ;;
esac
command -v ninja >/dev/null || die "ninja not found (pip install ninja)"
"$PY" -c 'import torch, setuptools, wheel, packaging' || die "$PY needs torch, setuptools, wheel and packaging"
# -lcudart needs an unversioned libcudart.so (pip-style toolkits ship only libcudart.so.NN)
if ! ls "$CUDA_HOME"/lib64/libcudart.so "$CUDA_HOME"/lib/libcudart.so >/dev/null 2>&1; then
  RT=$(ls "$CUDA_HOME"/lib*/libcudart.so.* 2>/dev/null | head -1 || true)
  if [ -n "$RT" ]; then
    mkdir -p "$WORK.lib"; ln -sf "$RT" "$WORK.lib/libcudart.so"
    export LIBRARY_PATH="$WORK.lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
fi
# CUDA 13 keeps CCCL (cuda/std, cub) under include/cccl: make sure the host compiler sees it
if [ ! -e "$CUDA_HOME/include/cccl/cuda/std/version" ] && [ ! -e "$CUDA_HOME/include/cuda/std/version" ]; then
  V=$(find "$CUDA_HOME/" /usr/local/cuda*/ -path '*cuda/std/version' 2>/dev/null | head -1 || true)
  [ -n "$V" ] && export CPLUS_INCLUDE_PATH="${V%/cuda/std/version}${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
fi

# ---- sources, staged as setup.py expects them: <root>/{hopper, README.md, csrc/cutlass/include}
rm -rf "$WORK"; mkdir -p "$WORK/fa/csrc/cutlass"
if [ -n "${FA3_SRC:-}" ]; then
  [ -d "$FA3_SRC/hopper" ] && [ -d "$FA3_SRC/csrc/cutlass/include" ] \
    || die "FA3_SRC=$FA3_SRC: need hopper/ and csrc/cutlass/include (git submodule update --init csrc/cutlass)"
  FA_AT=$(git -C "$FA3_SRC" rev-parse HEAD)
  CUTLASS_AT=$(git -C "$FA3_SRC/csrc/cutlass" rev-parse HEAD)
  cp -a "$FA3_SRC/hopper" "$FA3_SRC/README.md" "$FA3_SRC/LICENSE" "$WORK/fa/"
  rm -rf "$WORK/fa/hopper/build"
  cp -a "$FA3_SRC/csrc/cutlass/include" "$FA3_SRC/csrc/cutlass/LICENSE.txt" "$WORK/fa/csrc/cutlass/"
  SRC_DESC="git checkout $FA3_SRC"
else
  TARBALL=${FA3_TARBALL:-}
  for t in "$REPO/.fa3/fa3-src.tar.xz" "$REPO/../shared/fa3/fa3-src.tar.xz"; do
    [ -n "$TARBALL" ] || { [ -f "$t" ] && TARBALL=$t; }
  done
  [ -n "$TARBALL" ] && [ -f "$TARBALL" ] || die "no sources: set FA3_SRC (git checkout) or FA3_TARBALL (fa3-src.tar.xz)"
  tar -xJf "$TARBALL" -C "$WORK"
  FA_AT=$(cat "$WORK/fa/FA_COMMIT" 2>/dev/null || echo unknown)
  CUTLASS_AT=$(cat "$WORK/fa/csrc/cutlass/CUTLASS_COMMIT" 2>/dev/null || echo unknown)
  SRC_DESC="tarball $TARBALL"
fi
if [ "$FA_AT" != "$FA_PIN" ] || [ "$CUTLASS_AT" != "$CUTLASS_PIN" ]; then
  MSG="sources are flash-attention $FA_AT + CUTLASS $CUTLASS_AT, not the pinned $FA_PIN + $CUTLASS_PIN"
  [ "${FA3_ANY_COMMIT:-0}" = 1 ] || die "$MSG (FA3_ANY_COMMIT=1 builds them anyway)"
  echo "build_fa3: WARNING: $MSG"
fi
H=$WORK/fa/hopper
"$PY" "$REPO/scripts/fa3_setup_patch.py" "$H/setup.py"
if [ "${FA3_DPSUM:-0}" = 1 ]; then "$PY" "$REPO/scripts/fa3_dpsum_patch.py" "$H" || die "the FA3_DPSUM patch did not apply"; fi
if [ -n "${FA3_FWD64_CAUSAL_TILE:-}" ]; then
  "$PY" "$REPO/scripts/fa3_tile_patch.py" "$H" "$FA3_FWD64_CAUSAL_TILE" || die "the FA3_FWD64_CAUSAL_TILE patch did not apply"
fi
if [ -n "${FA3_BWD64_CAUSAL:-}" ]; then
  "$PY" "$REPO/scripts/fa3_bwd_patch.py" "$H" "$FA3_BWD64_CAUSAL" || die "the FA3_BWD64_CAUSAL patch did not apply"
fi

# ---- optional ptxas: a toolkit overlay whose bin/ptxas is scripts/fa3_ptxas.sh ---------------
PTXAS_DESC="$("$CUDA_HOME/bin/ptxas" --version | grep -o 'release [0-9.]*') (toolkit)"
if [ -n "${FA3_PTXAS:-}" ]; then
  [ -x "$FA3_PTXAS" ] || die "FA3_PTXAS=$FA3_PTXAS is not an executable"
  TK=$WORK/toolkit; mkdir -p "$TK/bin"
  for e in "$CUDA_HOME"/*; do [ "${e##*/}" = bin ] || ln -s "$e" "$TK/${e##*/}"; done
  for e in "$CUDA_HOME"/bin/*; do ln -s "$e" "$TK/bin/${e##*/}"; done
  # nvcc finds ptxas through its own folder (_HERE_), so it must be a copy, not a link
  rm "$TK/bin/nvcc" "$TK/bin/ptxas"; cp "$(readlink -f "$CUDA_HOME/bin/nvcc")" "$TK/bin/nvcc"
  cp "$REPO/scripts/fa3_ptxas.sh" "$TK/bin/ptxas"
  export FA3_REAL_PTXAS=$(readlink -f "$FA3_PTXAS")
  CUDA_HOME=$TK
  PTXAS_DESC="$("$FA3_REAL_PTXAS" --version | grep -o 'release [0-9.]*') ($FA3_REAL_PTXAS)"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

# ---- feature flags ------------------------------------------------------------------------------
export FLASH_ATTENTION_FORCE_BUILD=TRUE     # never try to download a prebuilt wheel
export FLASH_ATTENTION_OFFLINE_BUILD=TRUE   # never download a toolchain
OFF="SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP FP16 FP8 VARLEN SM80 HDIM96 HDIM128 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192"
LOCAL=lmcore.hd64bf16
if [ "${FA3_PACKGQA:-0}" = 1 ]; then LOCAL=$LOCAL.packgqa; else OFF="$OFF PACKGQA"; fi
[ -n "${FA3_PTXAS:-}" ] && LOCAL=$LOCAL.ptxas$("$FA3_REAL_PTXAS" --version | grep -o 'release [0-9.]*' | tr -dc 0-9)
[ "${FA3_DPSUM:-0}" = 1 ] && LOCAL=$LOCAL.dpsum
[ -n "${FA3_FWD64_CAUSAL_TILE:-}" ] && LOCAL=$LOCAL.fwd$FA3_FWD64_CAUSAL_TILE
[ -n "${FA3_BWD64_CAUSAL:-}" ] && LOCAL=$LOCAL.$("$PY" "$REPO/scripts/fa3_bwd_patch.py" --tag "$FA3_BWD64_CAUSAL")
[ -n "${FA3_TAG:-}" ] && LOCAL=$LOCAL.$FA3_TAG
for f in $OFF; do export "FLASH_ATTENTION_DISABLE_$f=TRUE"; done
unset FLASH_ATTENTION_DISABLE_BACKWARD FLASH_ATTENTION_DISABLE_HDIM64 FLASH_ATTENTION_DISABLE_CLUSTER FLASH_ATTENTION_ENABLE_VCOLMAJOR
export FLASH_ATTN_LOCAL_VERSION=$LOCAL TORCH_CUDA_ARCH_LIST=9.0a
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-2}

say "sources: $SRC_DESC (flash-attention ${FA_AT:0:12}, CUTLASS ${CUTLASS_AT:0:12})"
say "toolchain: $("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'), nvcc $(nvcc --version | grep -o 'release [0-9.]*'), ptxas $PTXAS_DESC"
say "switched off: $OFF"
say "building on $(nproc) cores (MAX_JOBS=$MAX_JOBS); log $OUT/fa3_build.log"
rm -f "$OUT"/flash_attn_3-*.whl
set +e
( cd "$H" && "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -v -w "$OUT" . ) > "$OUT/fa3_build.log" 2>&1
RC=$?
set -e
NL=$(find "$H/build" -name .ninja_log 2>/dev/null | head -1)
if [ -n "$NL" ]; then
  echo "compile seconds per object:"
  awk -F'\t' '!/^#/ {n = split($4, a, "/"); printf "  %7.1f  %s\n", ($2 - $1) / 1000, a[n]}' "$NL" | sort -rn
fi
if [ $RC -ne 0 ]; then
  grep -n -E "error|FAILED" "$OUT/fa3_build.log" | head -40
  die "build failed (rc $RC); see $OUT/fa3_build.log"
fi
WHL=$(ls "$OUT"/flash_attn_3-*.whl)
echo "kernels (count, kernel, ptxas registers and spills):"
awk '/Compiling entry function/ { k = "other"; if (match($0, /FlashAttn[A-Za-z0-9]+/)) { k = substr($0, RSTART, RLENGTH); sub(/I(N|[0-9]).*$/, "", k) } }
     /bytes stack frame/ { sub(/^ */, ""); spill = $0 }
     /ptxas info *: Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print k ", " substr($0, RSTART + 5, RLENGTH - 5) ", " spill }' \
  "$OUT/fa3_build.log" | sort | uniq -c | sort -k2 | sed 's/^/  /' 
say "built $WHL"
echo "  $(stat -c %s "$WHL") bytes, sha256 $(sha256sum "$WHL" | cut -d' ' -f1)"
echo "  flash-attention $FA_AT, CUTLASS $CUTLASS_AT; kernels: sm_90a bf16 hdim64 fwd+bwd$([ "${FA3_PACKGQA:-0}" = 1 ] && echo ' +PackGQA')"
