#!/usr/bin/env bash
# train.fa3_xsa_rowsum on a GPU machine, in one device call, then optionally the speed job:
#   1. FA3 built with FA3_DPSUM=1 (scripts/build_fa3.sh into .fa3/dpsum; skipped when a wheel is there:
#      carry .fa3 with it), installed in /tmp/fa3lm;
#   2. pytest -m cuda tests/test_fa3_xsa.py (train.fa3_dq_accum's too) and the XSA and fused q/k/v kernels' cuda tests
#      on that build;
#   3. when they pass, benchmarks/dq_accum_bench.py (train.fa3_dq_accum's kernels, with and without);
#   4. with START_SPEED=1: benchmarks/speed.sh start with LM_FA3_WHL=that wheel. LEVERS_OK is the after set
#      when the tests pass, LEVERS_FAIL when they do not (the environment's SOLO, LM2, ... as speed.sh takes them);
#      then lmcore runs on the plain FA3, so the job is not started if LEVERS_FAIL or SOLO need the FA3_DPSUM
#      build (needs_dpsum).
#   With NEW_TESTS (test files): those files' cuda tests run after step 2, and LEVERS_OK is taken only when they pass
#   too; when only they fail, LEVERS_BASE (still on the FA3_DPSUM build: levers built but not yet run on a GPU).
#   BENCH=0 skips step 3. POLL_END (default 540): the speed job is polled until that many seconds of this script.
# $OUT gets the wheel (in fa3_dpsum_wheel.tar: untar it in the checkout to skip the build next time), the
# build's summary and the tests' log. Carry .whl, .data, .ref and .fa3 (with fa3-src.tar.xz copied into it).
# Session 26 on nvidia-h200-x2: the build 145 s (32 cores), the tests 84 s, then the speed job 1,081 s.
# Session 28 on nvidia-h200: the build 100 s (16 cores), the tests 93 s; the bench about 20 s; the speed job with
# STAGES="peak orig1 lm1" ONE_GPU_RUNS="orig_fa3_1 lm_after_1 lm_solo_1" 592 s (two calls: start, then poll).
#   START_SPEED=1 LEVERS_OK="..." LEVERS_FAIL="..." SOLO="..." bash benchmarks/fa3_rowsum_check.sh
# Session 34 on nvidia-h200 (the wheel rebuilt for dq_accum_in, NEW_TESTS=tests/test_mlp_zeroes_dq.py, BENCH=0): the
# build 96 s, the tests 79 s, the new tests 50 s; the speed job was started by hand after it (838 s, two calls).
# Session 30 (the new levers' tests, then the table; lever_sets.sh names the sets):
#   source benchmarks/lever_sets.sh; NEW_TESTS="tests/test_fold_attn_norm.py tests/test_qkv_gate.py" BENCH=0 \
#   START_SPEED=1 LEVERS_OK="$GATE" LEVERS_BASE="$DQ" LEVERS_FAIL="$QF" SOLO="$DQ" ... bash benchmarks/fa3_rowsum_check.sh
# Session 37 on nvidia-h200: the FA3_DPSUM=1 FA3_FWD64_CAUSAL_TILE=128x128 wheel built on the CPU machine (README) and
# carried in .fa3/dpsum (no build), the tests 102 s, then the speed job with a twin of after as solo (984 s, three calls).
set -uo pipefail
source benchmarks/detached.sh  # fa3_dpsum_wheel, needs_dpsum
OUT=${OUT:-/tmp/fa3_rowsum_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fa3_dpsum_wheel "$OUT" || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/fa3lm .fa3/dpsum/flash_attn_3-*.whl || exit 1
echo "== pytest -m cuda ($SECONDS s)"
PYTHONPATH=/tmp/fa3lm:/tmp/site:$PWD timeout 360 python3 -m pytest -q -m cuda -rs -p no:cacheprovider \
  tests/test_fa3_xsa.py tests/test_kernels.py -k "xsa or fa3 or qkv" > "$OUT/cuda_tests.txt" 2>&1
RC=$?
grep -E "passed|failed|SKIPPED|Error" "$OUT/cuda_tests.txt" | tail -12
echo "== tests rc $RC ($SECONDS s)"
NEW_RC=0
if [ $RC -eq 0 ] && [ -n "${NEW_TESTS:-}" ]; then  # levers built on CPU, their first GPU run
  # shellcheck disable=SC2086 # NEW_TESTS: test files, split on purpose
  PYTHONPATH=/tmp/fa3lm:/tmp/site:$PWD timeout 300 python3 -m pytest -q -m cuda -rs -p no:cacheprovider \
    $NEW_TESTS > "$OUT/cuda_tests_new.txt" 2>&1
  NEW_RC=$?
  grep -E "passed|failed|SKIPPED|Error" "$OUT/cuda_tests_new.txt" | tail -12
  echo "== new tests rc $NEW_RC ($SECONDS s)"
fi
if [ $RC -eq 0 ] && [ "${BENCH:-1}" = 1 ]; then  # train.fa3_dq_accum's bench: FA3's backward and q's kernel with and without it
  PYTHONPATH=/tmp/fa3lm:/tmp/site:$PWD timeout 150 python3 benchmarks/dq_accum_bench.py > "$OUT/dq_accum_bench.txt" 2>&1
  tail -6 "$OUT/dq_accum_bench.txt"
fi
if [ "${START_SPEED:-0}" = 1 ]; then
  whl=""  # lmcore's runs on the FA3_DPSUM build only when its tests passed
  if [ $RC -eq 0 ] && [ $NEW_RC -ne 0 ]; then export LEVERS=$LEVERS_BASE; whl=$(ls "$PWD"/.fa3/dpsum/flash_attn_3-*.whl)
  elif [ $RC -eq 0 ]; then export LEVERS=$LEVERS_OK; whl=$(ls "$PWD"/.fa3/dpsum/flash_attn_3-*.whl); else export LEVERS=$LEVERS_FAIL; fi
  if [ $RC -ne 0 ] && needs_dpsum "$LEVERS ${SOLO-}"; then  # session 28: such runs died at their start
    echo "== the tests failed and LEVERS_FAIL or SOLO need the FA3_DPSUM build: the speed job is not started"
    exit $RC
  fi
  echo "== speed.sh start: LEVERS $LEVERS"
  LM_FA3_WHL=$whl bash benchmarks/speed.sh start $((${POLL_END:-540} - SECONDS))  # session 36: 570 overran the call
fi
exit $RC
