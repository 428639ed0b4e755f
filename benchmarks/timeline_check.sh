#!/usr/bin/env bash
# One device call: where consecutive steps' time goes on every rank (benchmarks/step_timeline.py),
# for lmcore with $LEVERS at record's batch on proxy data, on 2 ranks (torchrun, NCCL) and then on
# 1 GPU. When LEVERS has train.fa3_xsa_rowsum, FA3 is built with FA3_DPSUM=1 first (skipped when
# .fa3/dpsum has a wheel: carry .fa3; the wheel comes back in $OUT/fa3_dpsum_wheel.tar).
# Carry .whl, .data, .ref and .fa3 (with fa3-src.tar.xz copied into it).
# Session 27 on nvidia-h200-x2: 286 s (the FA3 build 121 s, data 9 s, 2 ranks 91 s, 1 GPU 65 s).
#   LEVERS="train.fused_qkv=true ..." RANKS="2 1" bash benchmarks/timeline_check.sh
set -uo pipefail
source benchmarks/detached.sh  # fa3_dpsum_wheel
OUT=${OUT:-/tmp/timeline_out}
W=/tmp/timeline  # the results, tarred into $OUT at the end ($OUT takes at most 8 files back)
LEVERS=${LEVERS:-}
RANKS=${RANKS:-2 1}
STEPS=${STEPS:-20}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
whl=.fa3/dist/flash_attn_3-*.whl
if [[ " $LEVERS " == *" train.fa3_xsa_rowsum=true "* ]]; then
  fa3_dpsum_wheel "$OUT" || exit 1
  whl=.fa3/dpsum/flash_attn_3-*.whl
fi
# shellcheck disable=SC2086 # a glob
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3lm $whl || exit 1
BASE=/tmp/fa3lm:/tmp/site:$PWD
TOK=.data/fineweb_1024_bpe.model
echo "== data ($SECONDS s)"
PYTHONPATH=$BASE python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer "$TOK" --out /tmp/proxy \
  --val-docs 1500 --shard-tokens 10000000 --no-progress > "$W/data.txt" 2>&1 || exit 1
sets=(--set data.data_dir=/tmp/proxy --set data.tokenizer="$TOK" --set model.attention=fa3 --set train.warmdown_iters=0)
for kv in $LEVERS; do sets+=(--set "$kv"); done
for n in $RANKS; do
  echo "== $n rank(s) ($SECONDS s)"
  rm -rf "/tmp/tl_run_$n"
  PYTHONPATH=$BASE TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout 400 python3 -m torch.distributed.run --standalone \
    --nproc_per_node="$n" benchmarks/step_timeline.py --preset record "${sets[@]}" --run-dir "/tmp/tl_run_$n" \
    --out "$W/timeline_$n" --steps "$STEPS" --profile 3 --trace > "$W/timeline_$n.log" 2>&1
  echo "rc $?"
  gzip -f "$W"/timeline_"$n"/trace_rank*.json 2> /dev/null
  grep -v "^USDT\|Warning\|warn" "$W/timeline_$n.log" | tail -60
done
tar -C "$W" -czf "$OUT/timeline.tgz" --exclude='trace_rank*' .
tar -C "$W" -cf "$OUT/traces.tar" $(cd "$W" && ls timeline_*/trace_rank*.json.gz 2> /dev/null)
[ "$(stat -c %s "$OUT/traces.tar")" -lt 16000000 ] || { echo "traces too large: left out"; rm "$OUT/traces.tar"; }
echo "== done ($SECONDS s)"
