# One short profiled `record` run on one GPU, and what inductor wrote for it: every compiled graph's
# module (its kernels' sources, and each kernel's ATen source nodes in comments) copied out of the
# run's inductor cache, so that a profile's kernel names can be read as the model's ops.
#
# usage (device machine, .whl .data .fa3 carried):
#   LEVERS="train.fused_qkv=true ..." STEPS=14 bash benchmarks/inductor_dump.sh
# Writes $OUT/run (the run folder; profile/breakdown.json of step STEPS - 2), $OUT/run.log and
# $OUT/graphs/*.py (the modules, those that define Triton kernels).
source benchmarks/common.sh
STEPS=${STEPS:-14}
[ -d /tmp/fa3 ] || python3 -m pip install -q --no-index --no-deps --target /tmp/fa3 .fa3/dist/*.whl
CACHE=$B/inductor_dump
rm -rf "$CACHE" "$OUT/run"
sets=()
for l in $LEVERS; do sets+=(--set "$l"); done
PYTHONPATH=/tmp/fa3:$PYTHONPATH TORCHINDUCTOR_CACHE_DIR=$CACHE timeout 500 python3 -m lmcore train --preset record \
  --set data.data_dir="$B/proxy" --set data.tokenizer="$TOK" --set train.iterations="$STEPS" \
  --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 --set train.log_every=10 \
  --set data.val_max_tokens=262145 --set model.attention=fa3 --set train.profile_step=$((STEPS - 2)) \
  "${sets[@]}" --no-progress --run-dir "$OUT/run" > "$OUT/run.log" 2>&1
tail -3 "$OUT/run.log"
mkdir -p "$OUT/graphs"
grep -rl --include='*.py' 'async_compile.triton(' "$CACHE" | while read -r f; do cp "$f" "$OUT/graphs/"; done
ls -la "$OUT/graphs"
