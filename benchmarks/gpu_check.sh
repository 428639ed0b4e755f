#!/usr/bin/env bash
# One device call: CUDA tests of attention/model, the attention benchmark, a compiled
# record-model micro-batch per backend. Logs under $OUT.
set -x
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -x tests/test_attention.py tests/test_model.py 2>&1 | tail -15
python3 benchmarks/attention_bench.py 2>&1 | tail -20
python3 benchmarks/model_step_check.py 2>&1 | tail -20
