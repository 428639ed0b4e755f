#!/usr/bin/env bash
# FlashAttention-3 on the GPU machine, as ONE job (issue 14):
# 1. builds FA3 with scripts/build_fa3.sh from .fa3/fa3-src.tar.xz (timed; in the background)
# 2. attention_bench.py (--profile) for every FA3 wheel in $FA3_WHEELS (default wheels/:
#    builds of scripts/build_fa3.sh, e.g. with ptxas 12.8 or PackGQA; wheels/exp/: builds of
#    patched sources, e.g. other tile sizes), each in its own process
# 3. pytest -m cuda tests/test_attention.py with FA3 installed (fwd + bwd vs fp32 at the
#    record's shape, FA3 error vs the other fused kernels', torch.compile)
# "The" FA3 of 3 and 4 is $FA3_TABLE_BUILD (default lmcore.hd64bf16: build_fa3.sh's default).
# 4. checks the wheel built in 1 (errors + timing), then the table: attention fwd+bwd for
#    fa3, sdpa_cudnn, sdpa_flash, and step time at `record`'s per-GPU batch for the original
#    script with real FA3 (its own flash_attn_interface import), the original with the FA2
#    shim (.ref/flash_attn_interface.py), lmcore fa3 and lmcore sdpa_cudnn
# Every FA3 process runs under `timeout`. It takes longer than one device call (10 min), so
# `start` runs it detached (setsid) and polls; `poll` (the next call, issued within 30 s of
# the last) goes on. Carry .whl (brotli), .data, .ref, .fa3 and the wheels.
#   bash benchmarks/fa3_job.sh start [POLL_S]  |  bash benchmarks/fa3_job.sh poll [POLL_S]
# FA3_ONLY_TABLE=1 skips 1-3 and the check in 4: only the table.
# Leaves $OUT/fa3_job.log (the job's log), $OUT/fa3_results.tgz (every log and JSON) and
# $OUT/fa3_table.md (the table).
set -uo pipefail
S=/tmp/fa3job
MODE=${1:-poll}
POLL_S=${2:-560}
STEPS=${STEPS:-30}

source benchmarks/detached.sh  # stamp, run_until, detached_poll, detached_main

# step_run NAME LOG STOP CMD...: run a training command (600 s at most); with STOP, end it
# once its log shows STOP (the original goes on to calibration after its last val line)
step_run() {
  local name=$1 log=$2 stop=$3; shift 3
  echo "== step time: $name ($((SECONDS - T0)) s)"
  run_until 600 "$log" "$stop" "$@"
  grep -E "step:$STEPS/$STEPS|attention_backend|done: |Traceback|Error" "$log" | head -5
}

job() {
  cd "$S/src" || exit 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  local R=$S/res TOK=$S/src/.data/fineweb_1024_bpe.model D=$S/proxy
  T0=$SECONDS
  mkdir -p "$R"
  echo "== setup"
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  local BASE=/tmp/site:$S/src v w variants=() exps=()
  for w in "${FA3_WHEELS:-wheels}"/flash_attn_3-*.whl "${FA3_WHEELS:-wheels}"/exp/flash_attn_3-*.whl; do
    [ -f "$w" ] || continue
    v=$(basename "$w" | sed -E 's/^flash_attn_3-[^+]*\+?([^-]*)-.*/\1/'); v=${v:-plain}
    python3 -m pip install -q --no-index --no-deps --upgrade --target "/tmp/fa3/$v" "$w" || continue
    case $w in */exp/*) exps+=("$v") ;; *) variants+=("$v") ;; esac
  done
  echo "FA3 builds: ${variants[*]}; patched-source experiments: ${exps[*]}"
  PYTHONPATH=$BASE python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer "$TOK" \
    --out "$D" --val-docs 1500 --shard-tokens 10000000 --no-progress --overwrite > "$R/shards.log" 2>&1 || tail -3 "$R/shards.log"
  local bpid="" only=${FA3_ONLY_TABLE:-0} best=${FA3_TABLE_BUILD:-lmcore.hd64bf16}
  [ -d "/tmp/fa3/$best" ] || { echo "FA3 build $best is not among the wheels; stopping"; return 1; }
  local FA3=/tmp/fa3/$best
  if [ "$only" != 1 ] && [ "${FA3_JOB_BUILD:-1}" = 1 ]; then
    echo "== FA3 build on this machine, in the background ($((SECONDS - T0)) s)"
    (MAX_JOBS=8 nice -n 5 timeout 900 bash scripts/build_fa3.sh "$S/gpubuild" > "$R/build_gpu.out" 2>&1; echo "rc $?" >> "$R/build_gpu.out") &
    bpid=$!
  fi

  if [ "$only" != 1 ]; then
    echo "== attention micro-benchmarks per FA3 build ($((SECONDS - T0)) s)"
    for v in "${variants[@]}" "${exps[@]}"; do
      PYTHONPATH=/tmp/fa3/$v:$BASE timeout 300 python3 benchmarks/attention_bench.py --iters 30 --profile \
        --json "$R/attn_$v.json" > "$R/attn_$v.log" 2>&1; echo "rc $?" >> "$R/attn_$v.log"
      echo "-- $v"; grep -v "^    " "$R/attn_$v.log" | tail -9
    done
    echo "== pytest -m cuda tests/test_attention.py with $best ($((SECONDS - T0)) s)"
    PYTHONPATH=$FA3:$BASE timeout 600 python3 -m pytest -q -m cuda -s -rs tests/test_attention.py \
      > "$R/pytest_cuda.log" 2>&1; echo "rc $?" >> "$R/pytest_cuda.log"
    grep -E "relative error|^fa3 |passed|failed|SKIPPED|Error|rc " "$R/pytest_cuda.log" | cut -c1-400
  fi

  if [ -n "$bpid" ]; then
    echo "== wait for the FA3 build ($((SECONDS - T0)) s)"
    wait $bpid; cat "$R/build_gpu.out"
  fi
  if ls "$S"/gpubuild/flash_attn_3-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/fa3/gpubuild "$S"/gpubuild/flash_attn_3-*.whl
    PYTHONPATH=/tmp/fa3/gpubuild:$BASE timeout 300 python3 benchmarks/attention_bench.py --backends fa3 \
      --json "$R/attn_gpubuild.json" > "$R/attn_gpubuild.log" 2>&1; echo "rc $?" >> "$R/attn_gpubuild.log"
    tail -4 "$R/attn_gpubuild.log"
  fi

  echo "== THE TABLE: attention, then step times, FA3 = $best ($((SECONDS - T0)) s)"
  PYTHONPATH=$FA3:$BASE timeout 300 python3 benchmarks/attention_bench.py --backends fa3,sdpa_cudnn,sdpa_flash \
    --json "$R/table_attn.json" > "$R/table_attn.log" 2>&1; tail -7 "$R/table_attn.log"
  # The original with real FA3: its script and run_seed.py in a folder without the shim.
  mkdir -p "$S/run_orig_fa3" "$S/run_orig_fa2"
  original_alone "$S/orig_fa3" "$FA3:$BASE" run_seed.py || return 1
  local ENVO="DATA_PATH=$D TOKENIZER_PATH=$TOK ITERATIONS=$STEPS WARMDOWN_ITERS=0 MAX_WALLCLOCK_SECONDS=0 SEED=1337 TTT_ENABLED=0 TRAIN_LOG_EVERY=10"
  (cd "$S/run_orig_fa3" && step_run "original, real FA3" "$R/orig_fa3.log" "step:$STEPS/$STEPS val_loss" \
    env $ENVO RUN_ID=orig_fa3 PYTHONPATH=$FA3:$BASE python3 "$S/orig_fa3/run_seed.py" "$S/orig_fa3")
  (cd "$S/run_orig_fa2" && step_run "original, FA2 shim" "$R/orig_fa2.log" "step:$STEPS/$STEPS val_loss" \
    env $ENVO RUN_ID=orig_fa2 PYTHONPATH=$BASE python3 "$S/src/.ref/run_seed.py" "$S/src/.ref")
  local att
  for att in fa3 sdpa_cudnn; do
    step_run "lmcore $att" "$R/lm_$att.log" "" env PYTHONPATH=$FA3:$BASE python3 -m lmcore train --preset record \
      --set data.data_dir="$D" --set data.tokenizer="$TOK" --set train.iterations=$STEPS \
      --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 --set train.log_every=10 \
      --set data.val_max_tokens=262145 --set model.attention=$att --no-progress --run-dir "$S/lm_$att"
    cp "$S/lm_$att/summary.json" "$R/lm_${att}_summary.json" 2>/dev/null
  done
  python3 benchmarks/fa3_report.py "$R" "$best" | tee "$R/fa3_table.md"
  echo "== done ($((SECONDS - T0)) s)"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$S/job.log" "$OUT/fa3_job.log" 2>/dev/null
  [ -d "$S/res" ] && tar -C "$S" -czf "$OUT/fa3_results.tgz" res
  cp "$S/res/fa3_table.md" "$OUT/" 2>/dev/null
  cp "$S"/gpubuild/flash_attn_3-*.whl "$OUT/" 2>/dev/null
  return 0
}

detached_main benchmarks/fa3_job.sh "FA3 JOB" "$MODE" || exit $?
