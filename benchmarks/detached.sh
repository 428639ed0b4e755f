# Sourced by the device jobs that outlast one device call (suite.sh, fa3_job.sh,
# capped_2gpu.sh, study_gpu.sh, speed.sh): `start` copies the working tree to $S/src and runs the script's `job`
# function there detached (setsid, so it survives the call), its output timestamped into
# $S/job.log; `poll` prints the log's new lines until $S/DONE appears or POLL_S seconds
# have passed, then runs the script's `collect` (copy results under $OUT). Issue each poll
# within 30 s of the last call's return, or the machine is given back. A poll with no job
# running and no DONE (a folder $S that no `start` made, or a job that died) says so and
# returns 1 at once: it does not wait out POLL_S on nothing (session 19 lost 470 s so).
# The sourcing script sets S (scratch folder), POLL_S and defines job() and collect(), then:
#   detached_main SCRIPT NAME MODE      (MODE: start | poll | job)

stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }

# run_until TIMEOUT LOG STOP CMD...: CMD in a session of its own (at most TIMEOUT s), its output
# in LOG; once LOG shows STOP (a grep pattern; empty: never) the whole session is ended GRACE_S
# (default 1) s later: SIGTERM to its process group, then SIGKILL to what is left of it after KILL_S
# (default 10) s, and it returns only once the group is gone. The original script, for one, goes on
# to calibration after its last line, and in session 27 one of its torchrun ranks outlived the SIGTERM
# by minutes, on the GPUs the next run (lmcore's, 424 ms a step instead of 254) trained on.
run_until() {
  local limit=$1 log=$2 stop=$3 i; shift 3
  setsid timeout "$limit" "$@" > "$log" 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    if [ -n "$stop" ] && grep -q "$stop" "$log"; then
      sleep "${GRACE_S:-1}"
      kill -- -$pid 2>/dev/null
      for ((i = 0; i < ${KILL_S:-10}; i++)); do kill -0 -- -$pid 2>/dev/null || break; sleep 1; done
      if kill -0 -- -$pid 2>/dev/null; then
        echo "run_until: $log: processes left ${KILL_S:-10} s after SIGTERM: SIGKILL" >&2
        kill -9 -- -$pid 2>/dev/null
      fi
      break
    fi
    sleep 3
  done
  wait $pid 2>/dev/null
  for ((i = 0; i < 30; i++)); do kill -0 -- -$pid 2>/dev/null || break; sleep 1; done
}

# fa3_dpsum_wheel OUT: FA3 built with FA3_DPSUM=1 (scripts/build_fa3.sh into .fa3/dpsum; skipped when a
# wheel is there: carry .fa3), the build's summary in OUT/fa3_dpsum_build.txt, and the wheel in
# OUT/fa3_dpsum_wheel.tar (a wheel's name ('+') does not come back itself: untar it in the checkout).
fa3_dpsum_wheel() {
  local out=$1 rc
  if ! ls .fa3/dpsum/flash_attn_3-*.whl > /dev/null 2>&1; then
    echo "== FA3_DPSUM=1 scripts/build_fa3.sh ($SECONDS s)"
    FA3_DPSUM=1 timeout 420 bash scripts/build_fa3.sh .fa3/dpsum > "$out/fa3_dpsum_build.txt" 2>&1
    rc=$?
    grep -v "^  " "$out/fa3_dpsum_build.txt" | tail -12
    [ $rc -eq 0 ] || { tail -40 .fa3/dpsum/fa3_build.log > "$out/fa3_build_tail.log"; return 1; }
  fi
  tar -cf "$out/fa3_dpsum_wheel.tar" .fa3/dpsum/flash_attn_3-*.whl
}

# needs_dpsum "OVERRIDES": whether --set overrides turn on a switch that runs only on the FA3_DPSUM build
# (train.fa3_xsa_rowsum, train.fa3_dq_accum, train.mlp_zeroes_dq_accum): such runs fail on the plain FA3 at their start.
needs_dpsum() {
  [[ " $1 " =~ [[:space:]]train\.(fa3_xsa_rowsum|fa3_dq_accum|mlp_zeroes_dq_accum)=(true|1)[[:space:]] ]]
}

# lm_fa3_install WHL DIR PYTHONPATH: another FA3 build (a wheel's path or glob, LM_FA3_WHL) installed into
# DIR for lmcore's runs only, and the module lmcore then imports (DIR first on PYTHONPATH).
lm_fa3_install() {
  # shellcheck disable=SC2086 # a glob
  python3 -m pip install -q --no-index --no-deps --target "$2" $1 || return 1
  PYTHONPATH=$2:$3 python3 -c "import flash_attn_interface as f; print('lmcore runs on fa3', f.__file__)"
}

# original_alone DIR PYTHONPATH [FILE...]: copies .ref/seed_train_gpt.py (and FILEs of .ref/) into DIR, a
# folder without .ref's FA2 shim, and fails unless flash_attn_interface resolves to FA3's from there
# (the wheel's module has flash_attn_with_kvcache, the shim does not). Python puts a script's own
# folder first on sys.path: run from .ref/, the original imports the shim whatever PYTHONPATH says.
original_alone() {
  local dir=$1 pp=$2 f
  shift 2
  mkdir -p "$dir" || return 1
  for f in seed_train_gpt.py "$@"; do cp ".ref/$f" "$dir/" || return 1; done
  (cd "$dir" && PYTHONPATH=$pp python3 -c "import flash_attn_interface as m; m.flash_attn_with_kvcache; \
print('the original imports FA3 from', m.__file__)") || { echo "$dir: flash_attn_interface there is not FA3's"; return 1; }
}

# both "CMD ARGS" "CMD ARGS": two commands side by side (each word-split), waiting for these two
# only. A bare `wait` also waits for the job's other background processes: speed.sh's clocks
# sampler never ends, and its 1-GPU pairs hung on it for 1,150 s in session 20.
# shellcheck disable=SC2086 # each command splits into its words on purpose
both() {
  local a b rc=0
  $1 &
  a=$!
  $2 &
  b=$!
  wait "$a" || rc=$?
  wait "$b" || rc=$?
  return $rc
}

detached_poll() {  # NAME
  local end=$((SECONDS + POLL_S)) off
  off=$(cat "$S/poll.offset" 2>/dev/null || echo 0)
  while :; do
    if [ -f "$S/job.log" ]; then
      tail -c +$((off + 1)) "$S/job.log"
      off=$(stat -c %s "$S/job.log"); echo "$off" > "$S/poll.offset"
    fi
    [ -f "$S/DONE" ] && { echo "$1 DONE"; break; }
    if ! kill -0 "$(cat "$S/job.pid" 2>/dev/null)" 2>/dev/null; then
      [ -f "$S/DONE" ] && continue  # it ended since the check above: the next round prints the rest
      echo "$1: no job is running in $S and it has no DONE: nothing to poll (move $S away, then start)"
      collect; return 1
    fi
    (( SECONDS >= end )) && { echo "$1 STILL RUNNING (poll again within 30 s)"; break; }
    sleep 5
  done
  collect
}

detached_main() {  # SCRIPT NAME MODE
  local script=$1 name=$2
  case $3 in
    start)
      [ -e "$S" ] && { echo "$S exists: the job already ran on this machine; use poll"; detached_poll "$name" || return; return; }
      mkdir -p "$S/src"
      tar --exclude=./.git --exclude=./runs --exclude=./data -cf - . | tar -C "$S/src" -xf - || return 1
      (cd "$S/src" && setsid nohup bash -c "echo \$\$ > $S/job.pid; source $script job; job 2>&1 | stamp > $S/job.log; touch $S/DONE" \
        > "$S/nohup.log" 2>&1 < /dev/null &)
      sleep 2
      detached_poll "$name" ;;
    poll) detached_poll "$name" || return ;;
    job) ;;  # sourced by the detached shell for the functions
    *) echo "usage: $script start|poll [POLL_S]"; return 2 ;;
  esac
}
