#!/usr/bin/env bash
# One-call GPU benchmark of `lmcore pack` against the original script (SPEC 5 and 8).
#
# Carry: .ref (seed_train_gpt.py + flash_attn_interface.py), .whl (the brotli wheel; the
# GPU machine has no brotli). Optional, for the quantization-loss comparison:
#   STATE=runs/proxy1/model.pt          a trained lmcore model.pt
#   DATA_DIR=...                        shards with fineweb_val_*.bin, or
#   DOCS=.data/proxy_docs.jsonl.xz      documents to build them from (lmcore data build)
#   TOKENIZER=.data/fineweb_1024_bpe.model
# Extra arguments go to benchmarks/pack_bench.py. Logs and pack_bench.json go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import brotli" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUTDIR=${OUT:-/tmp/pack_bench}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
ARGS=(--ref .ref --out "$OUTDIR")
if [[ -n "${STATE:-}" ]]; then
  ARGS+=(--state "$STATE")
  if [[ -z "${DATA_DIR:-}" && -n "${DOCS:-}" && -n "${TOKENIZER:-}" ]]; then
    DATA_DIR=/tmp/pack_bench_shards
    python3 -m lmcore data build --docs "$DOCS" --tokenizer "$TOKENIZER" --out "$DATA_DIR" \
      --val-docs 1500 --no-progress --overwrite
  fi
  if [[ -n "${DATA_DIR:-}" && -n "${TOKENIZER:-}" ]]; then
    ARGS+=(--data-dir "$DATA_DIR" --tokenizer "$TOKENIZER")
  fi
fi
python3 benchmarks/pack_bench.py "${ARGS[@]}" "$@" 2>&1 | tee "$OUTDIR/pack_bench.log"
