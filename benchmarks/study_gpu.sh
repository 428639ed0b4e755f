#!/usr/bin/env bash
# The study's GPU runs as ONE job: `lmcore study plan studies/gpu.json` (PLAN=) on every GPU of
# the machine (one run a GPU, the GPU pool), after building the proxy shards. Each poll leaves
# $OUT/study_gpu.log and $OUT/study_runs.tgz: the run folders' small files (config, metrics,
# summary, pack/eval JSON, logs; no weights, artifacts or checkpoints), to unpack into the repo.
# It outlasts one device call, so `start` runs it detached (benchmarks/detached.sh) and polls;
# `poll` (the next call, within 30 s of the last) goes on. Carry .whl, .data and .fa3.
# IF_EXISTS=keep continues a study: the committed run folders (runs/, small files only) are
# copied in and every finished run is kept; only the plan's other runs (new seeds) train.
#   bash benchmarks/study_gpu.sh start [POLL_S]  |  bash benchmarks/study_gpu.sh poll [POLL_S]
set -uo pipefail
S=/tmp/study_gpu
MODE=${1:-poll}
POLL_S=${2:-540}
PLAN=${PLAN:-studies/gpu.json}
IF_EXISTS=${IF_EXISTS:-replace}
export STUDY_ORIGIN=${STUDY_ORIGIN:-$PWD}  # the checkout `start` runs in (its runs/ travels; the job's copy leaves it out)

source benchmarks/detached.sh  # stamp, detached_poll, detached_main

job() {
  cd "$S/src" || exit 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  echo "== setup"
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .fa3/dist/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$S/src
  python3 -c "import torch, flash_attn_interface as f; print('torch', torch.__version__, 'fa3', f.__file__)"
  mkdir -p data/tokenizers && cp .data/fineweb_1024_bpe.model data/tokenizers/
  python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer data/tokenizers/fineweb_1024_bpe.model \
    --out data/proxy --val-docs 1500 --shard-tokens 10000000 --no-progress || return 1
  if [ "$IF_EXISTS" = keep ] && [ -d "$STUDY_ORIGIN/runs" ]; then
    mkdir -p runs && cp -r "$STUDY_ORIGIN/runs/." runs/
  fi
  echo "== plan $PLAN (if exists: $IF_EXISTS)"
  python3 -m lmcore study plan "$PLAN" --runs-dir runs --no-progress --if-exists "$IF_EXISTS"
  echo "== done"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$S/job.log" "$OUT/study_gpu.log" 2>/dev/null
  [ -d "$S/src/runs" ] && tar -C "$S/src/runs" -czf "$OUT/study_runs.tgz" --exclude='*.pt' --exclude='*.ptz' \
    --exclude=checkpoints --exclude='replaced-*' --exclude='.lock' .
  return 0
}

detached_main benchmarks/study_gpu.sh "STUDY" "$MODE" || exit $?
