#!/usr/bin/env bash
# The ignored folders a device job carries (`run`'s carry: .whl .data .ref .fa3), made in one go on the CPU machine
# of a fresh checkout (../shared/DEVICE.md and the README's Benchmarks section say what each holds):
#   .data/  the proxy docs and the official tokenizer, from ../shared
#   .ref/   ../shared/bench/* (the FA2 shim, run_seed.py, make_shards.py) and the original script, seed_train_gpt.py,
#           read out of a fetched mirror of github:izlley/parameter-golf (MIRROR: its git directory; the `fetch` tool
#           prints it). Never committed: .ref is ignored
#   .whl/   brotli for the device's Python 3.12 (pip download: the package registry only)
#   .fa3/   ../shared/fa3's stock wheel (dist/) and its sources (fa3-src.tar.xz, for builds); `make fa3-dpsum-cpu`
#           adds lmcore's FA3_DPSUM wheel (.fa3/dpsum) after this
# A folder already there is left as it is (delete it to make it again). Exit 2, with one line, where an input is missing.
# DEST: where the folders go (default the checkout); SHARED: ../shared from there.
#   MIRROR=/work/.mirror/izlley+parameter-golf/repo bash scripts/device_carry.sh
set -euo pipefail
cd "${DEST:-$(dirname "$0")/..}"
SHARED=${SHARED:-../shared}
BRANCH=record/latentmask-ttt-gptq-productkey-brotli
SCRIPT=records/track_10min_16mb/2026-04-05_11L_LatentMaskTTT_GPTQ_ProductKey_Brotli/train_gpt.py

need() {  # PATH: exit 2 naming it when it is not there
  [ -e "$1" ] || { echo "device_carry: $1: no such file (see ../shared/DEVICE.md)" >&2; exit 2; }
}

made() { echo "device_carry: $1 $2"; }

if [ -d .data ]; then made .data "already there"; else
  need "$SHARED/data/proxy_docs.jsonl.xz"; need "$SHARED/tokenizers/fineweb_1024_bpe.model"
  mkdir -p .data.tmp
  cp "$SHARED/data/proxy_docs.jsonl.xz" "$SHARED"/tokenizers/fineweb_1024_bpe.* .data.tmp/
  mv .data.tmp .data && made .data "from $SHARED"
fi

if [ -d .ref ]; then made .ref "already there"; else
  need "$SHARED/bench/flash_attn_interface.py"
  [ -n "${MIRROR:-}" ] || { echo "device_carry: MIRROR: not set (the git directory of a fetched github:izlley/parameter-golf)" >&2; exit 2; }
  need "$MIRROR"
  mkdir -p .ref.tmp
  cp "$SHARED"/bench/* .ref.tmp/
  git -C "$MIRROR" show "$BRANCH:$SCRIPT" > .ref.tmp/seed_train_gpt.py 2>/dev/null || {
    echo "device_carry: $MIRROR: no $BRANCH:$SCRIPT" >&2; rm -rf .ref.tmp; exit 2; }
  mv .ref.tmp .ref && made .ref "from $SHARED/bench and $MIRROR"
fi

if [ -d .whl ]; then made .whl "already there"; else
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl.tmp brotli
  mv .whl.tmp .whl && made .whl "brotli for Python 3.12"
fi

if [ -d .fa3/dist ]; then made .fa3 "already there"; else
  need "$SHARED/fa3/dist"; need "$SHARED/fa3/fa3-src.tar.xz"
  mkdir -p .fa3/dist.tmp
  cp "$SHARED"/fa3/dist/*.whl .fa3/dist.tmp/
  cp "$SHARED/fa3/fa3-src.tar.xz" .fa3/
  mv .fa3/dist.tmp .fa3/dist && made .fa3 "the stock wheel and the sources from $SHARED/fa3"
fi
du -sh .whl .data .ref .fa3 | tr '\n' ' '; echo "(carry at most 64 MiB in all)"
