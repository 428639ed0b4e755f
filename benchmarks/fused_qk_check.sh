#!/usr/bin/env bash
# One device call for train.fused_qk_norm_rope (lmcore.kernels): its CUDA tests (the Triton
# kernels against the PyTorch ones, the compiled model against the plain one), the kernel
# benchmark against the plain path compiled by inductor (benchmarks/qk_kernel_bench.py), then,
# if FUSED_STEPS > 0, lmcore `record` on one GPU with the switch for FUSED_STEPS steps (proxy
# data, FA3; no original beside it: its step time is not a ratio). Carry .whl, .data, .fa3.
# Logs under $OUT. Session 6 on nvidia-h200: about 300 s with FUSED_STEPS=40.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3 .fa3/dist/*.whl
export PYTHONPATH=/tmp/fa3:/tmp/site:$PWD
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
python3 -m pytest -q -m cuda tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -15
python3 benchmarks/qk_kernel_bench.py 2>&1 | tee "$OUT/qk_kernel_bench.md" | tail -24
if [ "${FUSED_STEPS:-40}" -gt 0 ]; then
  python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer .data/fineweb_1024_bpe.model \
    --out /tmp/proxy --val-docs 1500 --shard-tokens 10000000 --no-progress > /dev/null || exit 1
  python3 -m lmcore train --preset record --set data.data_dir=/tmp/proxy --set data.tokenizer=.data/fineweb_1024_bpe.model \
    --set train.iterations="${FUSED_STEPS:-40}" --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 \
    --set train.log_every=10 --set data.val_max_tokens=262145 --set model.attention=fa3 \
    --set train.fused_qk_norm_rope=true --set train.profile_step=$((${FUSED_STEPS:-40} - 5)) \
    --no-progress --run-dir "$OUT/lm_fused_1" > "$OUT/lm_fused_1.log" 2>&1
  tail -5 "$OUT/lm_fused_1.log"
  rm -f "$OUT"/lm_fused_1/*.pt; rm -rf "$OUT"/lm_fused_1/checkpoints
fi
