#!/usr/bin/env bash
# Device call A: the original script at proxy1 (1,000 steps of 196,608 tokens, warmdown 400,
# no cap, seed 1337, TTT off) on the proxy shards. Stops it once the trained weights are
# saved (its calibration/GPTQ phases are measured by pack_bench). Its log comes back in
# $OUT; run proxy1_lmcore.sh next on the same warm machine, then proxy1_report.py here.
source benchmarks/common.sh
rm -rf "$B/orig_proxy1"; mkdir -p "$B/orig_proxy1"; cd "$B/orig_proxy1"
DATA_PATH=$B/proxy TOKENIZER_PATH=$TOK TRAIN_BATCH_TOKENS=196608 ITERATIONS=1000 WARMDOWN_ITERS=400 \
MAX_WALLCLOCK_SECONDS=0 SEED=1337 TTT_ENABLED=0 RUN_ID=orig_proxy1 TRAIN_LOG_EVERY=100 \
  python3 ../../.ref/run_seed.py ../../.ref > "$OUT/orig_proxy1.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  if grep -q "Serialized model:" "$OUT/orig_proxy1.log"; then sleep 2; kill $pid; break; fi
  sleep 5
done
wait $pid
grep -E "step:(1|100|500|1000)/1000|DIAGNOSTIC|model_params|peak memory" "$OUT/orig_proxy1.log"
