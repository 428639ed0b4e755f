#!/usr/bin/env bash
# One H100 call: lmcore's LatentMask TTT eval of a packed run vs the original script's TTT
# phase on the same card, weights and val tokens (benchmarks/eval_bench.py); < 9 minutes.
#
# usage: benchmarks/eval_ttt.sh RUN_DIR [eval_bench.py options, e.g. --variants compiled,eager]
# carry: RUN_DIR (model.int6.ptz), .whl (brotli wheel), .ref (seed_train_gpt.py and
#   ../shared/bench/flash_attn_interface.py), .data (proxy_docs.jsonl.xz and
#   fineweb_1024_bpe.model). The val shards (first 1,500 proxy docs) are built into
#   .data/proxy_val unless DATA_DIR names a folder that has them.
set -euo pipefail
RUN_DIR=${1:?usage: eval_ttt.sh RUN_DIR [eval_bench.py options]}
shift
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/eval_bench_out}
mkdir -p "$OUT_DIR"
nvidia-smi -L || true
python3 benchmarks/eval_bench.py \
  --run-dir "$RUN_DIR" \
  --data-dir "${DATA_DIR:-.data/proxy_val}" \
  --docs .data/proxy_docs.jsonl.xz \
  --tokenizer .data/fineweb_1024_bpe.model \
  --ref-dir .ref \
  --out "$OUT_DIR" \
  "$@" 2>&1 | tee "$OUT_DIR/eval_bench.log"
