#!/usr/bin/env bash
# One device call for lmcore.kernels (train.fused_qk_norm_rope, train.fused_xsa_gate): their CUDA
# tests (the Triton kernels against the PyTorch ones, the compiled model with both switches
# against the plain one), the kernel benchmarks against the plain paths compiled by inductor
# (benchmarks/qk_kernel_bench.py, benchmarks/xsa_kernel_bench.py), then, if FUSED_STEPS > 0,
# lmcore `record` on one GPU with FUSED_SETS (default both switches) for FUSED_STEPS steps, one
# step profiled (proxy data, FA3; no original beside it: its step time is not a ratio). Carry
# .whl, .data, .fa3. Logs under $OUT. (fused_qk_check.sh before session 7.) Session 7 on
# nvidia-h200, with the q/k kernel alone and FUSED_STEPS=30: 219 s.
set -uo pipefail
export PYTHONUNBUFFERED=1
FUSED_SETS=${FUSED_SETS:-train.fused_qk_norm_rope=true train.fused_xsa_gate=true}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3 .fa3/dist/*.whl
export PYTHONPATH=/tmp/fa3:/tmp/site:$PWD
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
python3 -m pytest -q -m cuda tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -15
python3 benchmarks/qk_kernel_bench.py 2>&1 | tee "$OUT/qk_kernel_bench.md" | tail -24
python3 benchmarks/xsa_kernel_bench.py 2>&1 | tee "$OUT/xsa_kernel_bench.md" | tail -22
if [ "${FUSED_STEPS:-40}" -gt 0 ]; then
  python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer .data/fineweb_1024_bpe.model \
    --out /tmp/proxy --val-docs 1500 --shard-tokens 10000000 --no-progress > /dev/null || exit 1
  sets=()
  for s in $FUSED_SETS; do sets+=(--set "$s"); done
  python3 -m lmcore train --preset record --set data.data_dir=/tmp/proxy --set data.tokenizer=.data/fineweb_1024_bpe.model \
    --set train.iterations="${FUSED_STEPS:-40}" --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 \
    --set train.log_every=10 --set data.val_max_tokens=262145 --set model.attention=fa3 \
    "${sets[@]}" --set train.profile_step=$((${FUSED_STEPS:-40} - 5)) \
    --no-progress --run-dir "$OUT/lm_fused_1" > "$OUT/lm_fused_1.log" 2>&1
  tail -5 "$OUT/lm_fused_1.log"
  rm -f "$OUT"/lm_fused_1/*.pt; rm -rf "$OUT"/lm_fused_1/checkpoints
fi
