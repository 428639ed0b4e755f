#!/usr/bin/env bash
# Device call: step time at record's per-GPU batch (786,432 tokens = 8 x 98,304 on one GPU),
# 40 steps after the 20 compile warm-up steps, no warmdown (so no late-QAT recompile):
# the original script (SDPA flash = FA2), lmcore with the same kernel, lmcore with its
# default kernel (auto: cuDNN on H100 without FA3). Prints a table with the card.
source benchmarks/common.sh
N=${STEPS:-40}
mkdir -p "$B/orig_step"; cd "$B/orig_step"
DATA_PATH=$B/proxy TOKENIZER_PATH=$TOK ITERATIONS=$N WARMDOWN_ITERS=0 MAX_WALLCLOCK_SECONDS=0 \
SEED=1337 TTT_ENABLED=0 RUN_ID=orig_step TRAIN_LOG_EVERY=10 \
  python3 ../../.ref/run_seed.py ../../.ref > "$OUT/orig_step.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  if grep -q "step:$N/$N val_loss" "$OUT/orig_step.log"; then kill $pid; break; fi
  sleep 3
done
wait $pid
cd ../..
for att in sdpa_flash auto; do
  rm -rf "$B/lm_step_$att"
  python3 -m lmcore train --preset record --set data.data_dir=$B/proxy --set data.tokenizer=$TOK \
    --set train.iterations=$N --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 \
    --set train.log_every=10 --set data.val_max_tokens=262145 --set model.attention=$att \
    --no-progress --run-dir "$B/lm_step_$att" > "$OUT/lm_step_$att.log" 2>&1
  tail -3 "$OUT/lm_step_$att.log"
done
python3 - "$OUT/orig_step.log" "$B/lm_step_sdpa_flash/summary.json" "$B/lm_step_auto/summary.json" <<'PY'
import json, re, sys
log = open(sys.argv[1]).read()
m = re.findall(r"step:(\d+)/\d+ train_loss:[\d.]+ train_time:(\d+)ms step_avg:([\d.]+)ms", log)
o_ms = float(m[-1][2]) if m else float("nan")
rows = [("original (sdpa_flash/FA2)", o_ms, None)]
for p in sys.argv[2:]:
    s = json.load(open(p))
    rows.append((f"lmcore ({s['attention_backend']})", s["mean_step_ms"], s))
card = rows[1][2]["card"]
print(f"card: {card}; 786,432 tokens/step (8 x 98,304), seq 2048, {m[-1][0] if m else '?'} steps after compile warm-up")
print(f"{'run':28s} {'step ms':>9s} {'tokens/s':>12s} {'speed vs original':>18s}")
for name, ms, s in rows:
    print(f"{name:28s} {ms:9.1f} {786432 / ms * 1000:12,.0f} {o_ms / ms:17.3f}x")
PY
