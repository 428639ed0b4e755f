#!/usr/bin/env bash
# Quality at equal wall time, as ONE job: the original script and lmcore's `record` preset, each
# on 2 GPUs under torchrun (grad accum 4), 150 s training cap (CAP_S), seed 1337, proxy data, FA3
# in both (.fa3/dist/*.whl: the original runs from a folder of its own, so that it imports the
# wheel's flash_attn_interface, not .ref's FA2 shim, which it did here up to session 11; the job
# stops if it would not; lmcore's auto picks fa3). On a machine with 4 GPUs the two runs
# go side by side (GPUs 0,1 and 2,3), else one after the other. Prints the table (card, steps,
# mean step ms, raw and EMA val_bpb; benchmarks/capped_report.py); each poll leaves
# $OUT/capped_2gpu.log, table.md (once done) and capped_results.tgz (logs, summary.json, metrics).
# It can take longer than one device call, so `start` runs it detached (benchmarks/detached.sh)
# and polls; `poll` (the next call, within 30 s of the last) goes on. Carry .whl, .data, .ref, .fa3.
# NPROC=1 (default 2): each run on one GPU (grad accum 8) instead, one after the other: not issue
# 16's check, a stand-in where only one GPU is lent.
# Session 19 on nvidia-h200-x2 (2 ranks, one run after the other): 531 s, of which 511 s the two runs with
# their compiles and evaluations.
# LM_SETS: lmcore's --set overrides beyond `record` (e.g. "train.fused_qk_norm_rope=true
# train.fused_xsa_gate=true"), printed in the log's setup line; default none.
# LM_FA3_WHL: a wheel (path or glob) of another FA3 build for lmcore's runs only (e.g. FA3_DPSUM=1
# scripts/build_fa3.sh's, for train.fa3_xsa_rowsum in LM_SETS); the original keeps .fa3/dist's. Default none.
# SEEDS (default 1337): the pair of runs once a seed (the original's SEED, lmcore's train.seed), into
# res/sSEED/ with its table; the report ends with the seeds' table (lmcore's raw val_bpb minus the
# original's at each seed, their mean, sd and worst against the bar of 0.01). Each seed's pair takes
# about 511 s on x2 (session 19) and half of that on 4 GPUs.
#   bash benchmarks/capped_2gpu.sh start [POLL_S]  |  bash benchmarks/capped_2gpu.sh poll [POLL_S]
set -uo pipefail
S=/tmp/capped
MODE=${1:-poll}
POLL_S=${2:-540}
CAP_S=${CAP_S:-150}
NPROC=${NPROC:-2}
LM_SETS=${LM_SETS:-}
LM_FA3_WHL=${LM_FA3_WHL:-}
SEEDS=${SEEDS:-1337}

source benchmarks/detached.sh  # stamp, run_until, detached_poll, detached_main

original() {  # GPUS DIR SEED: DIR/original.log; after its post-EMA diagnostic it goes on to calibration: stopped there
  GRACE_S=2 run_until 900 "$2/original.log" "DIAGNOSTIC post_ema" env CUDA_VISIBLE_DEVICES="$1" DATA_PATH="$D" \
    TOKENIZER_PATH="$TOK" MAX_WALLCLOCK_SECONDS="$CAP_S" SEED="$3" TTT_ENABLED=0 RUN_ID=capped TRAIN_LOG_EVERY=50 \
    python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$S/orig_fa3/seed_train_gpt.py"
}

lmcore_run() {  # GPUS DIR SEED: DIR/lmcore_run, its output in DIR/lmcore.log
  local extra=() l pp=$PYTHONPATH
  for l in $LM_SETS; do extra+=(--set "$l"); done
  [ -n "$LM_FA3_WHL" ] && pp=/tmp/fa3lm:$pp  # lmcore's own FA3 build first
  PYTHONPATH=$pp CUDA_VISIBLE_DEVICES=$1 timeout 900 python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m lmcore train --preset record --set data.data_dir="$D" --set data.tokenizer="$TOK" \
    --set train.max_wallclock_seconds="$CAP_S" --set train.log_every=50 --set train.seed="$3" "${extra[@]}" \
    --no-progress --run-dir "$2/lmcore_run" > "$2/lmcore.log" 2>&1
}

setup() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .fa3/dist/*.whl 2>&1 | tail -2
  python3 -c "import torch, flash_attn_interface as f; print('torch', torch.__version__, 'fa3', f.__file__)"
  original_alone "$S/orig_fa3" "$PYTHONPATH" || return 1
  if [ -n "$LM_FA3_WHL" ]; then lm_fa3_install "$LM_FA3_WHL" /tmp/fa3lm "$PYTHONPATH" || return 1; fi
  python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer "$TOK" --out "$D" \
    --val-docs 1500 --shard-tokens 10000000 --no-progress
}

seed_pair() {  # N_GPUS SEED: the original and lmcore at SEED into $R/sSEED, then its table
  local o=$R/s$2
  mkdir -p "$o"
  echo "== seed $2"
  if [ "$NPROC" = 1 ]; then
    original 0 "$o" "$2"; lmcore_run 0 "$o" "$2"
  elif [ "$1" -ge 4 ]; then
    both "original 0,1 $o $2" "lmcore_run 2,3 $o $2"
  else
    original 0,1 "$o" "$2"; lmcore_run 0,1 "$o" "$2"
  fi
  python3 benchmarks/capped_report.py "$o/original.log" "$o/lmcore_run/summary.json" "$1" "$CAP_S" "$NPROC" \
    --seed "$2" | tee "$o/table.md"
}

job() {
  cd "$S/src" || exit 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  R=$S/res TOK=$S/src/.data/fineweb_1024_bpe.model D=$S/proxy
  mkdir -p "$R"
  echo "== setup; NPROC $NPROC; SEEDS $SEEDS; LM_SETS: ${LM_SETS:-none}; LM_FA3_WHL: ${LM_FA3_WHL:-(.fa3/dist)}"
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  export PYTHONPATH=/tmp/site:$S/src
  setup || return 1
  local n seed
  n=$(nvidia-smi -L | wc -l)
  echo "== training, cap $CAP_S s, $n GPUs"
  for seed in $SEEDS; do seed_pair "$n" "$seed"; done
  echo "== report"
  python3 benchmarks/capped_report.py --seeds-of "$R" | tee "$R/table.md"
  echo "== done"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$S/job.log" "$OUT/capped_2gpu.log" 2>/dev/null
  cp "$S/res/table.md" "$OUT/" 2>/dev/null
  [ -d "$S/res" ] && tar -C "$S/res" -czf "$OUT/capped_results.tgz" --exclude='*.pt' --exclude=checkpoints .
  return 0
}

detached_main benchmarks/capped_2gpu.sh "CAPPED" "$MODE" || exit $?
