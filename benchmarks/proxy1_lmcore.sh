#!/usr/bin/env bash
# Device call B: lmcore's proxy1 on the same shards with the original's attention kernel
# (SDPA flash = FA2). The device copy of the tree is laid anew per call, so fetch
# orig_proxy1.log (call A) and lm_proxy1_summary.json (this call) from $OUT and print the
# table here with benchmarks/proxy1_report.py (run both calls on the same warm machine).
source benchmarks/common.sh
rm -rf "$B/lm_proxy1"
python3 -m lmcore train --preset proxy1 --set data.data_dir=$B/proxy --set data.tokenizer=$TOK \
  --set model.attention=sdpa_flash --set train.log_every=100 --compare-ema --no-progress \
  --run-dir "$B/lm_proxy1" > "$OUT/lm_proxy1.log" 2>&1
tail -5 "$OUT/lm_proxy1.log"
cp "$B/lm_proxy1/summary.json" "$OUT/lm_proxy1_summary.json"
python3 benchmarks/proxy1_report.py "${ORIG_LOG:-$OUT/orig_proxy1.log}" "$B/lm_proxy1/summary.json" || true
