#!/usr/bin/env bash
# Issue 16's speed table as ONE job on a 2-GPU machine (nvidia-h200-x2): at `record`'s batch
# (786,432 tokens a step: 8 micro-batches of 48 x 2048 on one GPU, 4 per rank on two), no
# warmdown, seed 1337, proxy data, after the compile warm-up:
#   peak   the bf16 matmul peak of the card (benchmarks/matmul_peak.py), for the MFU, and the
#          rate it holds at its power limit (20 s of 8192-size matmuls, the second half timed)
#   orig1  the original script on 1 GPU, STEPS steps, with real FA3 (its own
#          flash_attn_interface import, GPU 0) beside it with the FA2 shim
#          (.ref/flash_attn_interface.py, GPU 1)
#   lm1    lmcore on 1 GPU, MATH_STEPS steps each, two at a time (GPU 0 and GPU 1; LM1_PAIRS
#          picks the pairs, default "before after"):
#          "before" (+ $BEFORE: lmcore before issue 16's levers, session 5's defaults; fa3)
#          beside "before" again (the run-to-run noise of the same math), then "after"
#          (today's defaults + $LEVERS) beside lmcore with $SOLO (another lever set, by
#          default the fused q/k and XSA kernels; SOLO_STEPS steps, ended after SOLO_TIMEOUT s); each but
#          the twin with one step profiled (train.profile_step: RUN/profile/breakdown.json)
#          and its top Triton kernels' sources copied out of inductor's cache
#          (benchmarks/kernel_sources.py: res/kernels/RUN)
#          then each of $VARIANTS, one at a time on GPU 0 ("NAME:overrides;NAME:overrides", run
#          lm_v_NAME_1, MATH_STEPS steps, profiled, ended after VARIANT_TIMEOUT s): lever sets
#          measured beside the table's runs (their same math is against the first of before,
#          after, solo that ran; their kernels against after's and solo's, where those ran)
#   orig2  the original with real FA3, 2 ranks under torchrun (NCCL), STEPS steps
#   lm2    lmcore's 2-rank runs under torchrun, STEPS steps each, profiled, in LM2's order (default
#          "after before"; "solo" runs $SOLO as lm_solo_2; a VARIANTS name runs that variant as
#          lm_v_NAME_2 though it also runs on GPU 0 in lm1)
# The 1-GPU runs go two at a time (so every 1-GPU run of the table has a neighbour); the
# 2-rank runs have the machine to themselves. On a 1-GPU machine (nvidia-h200) the 1-GPU runs
# go one at a time (ONE_GPU_RUNS, by default original FA3, before, after, solo, twin, original
# FA2) and the 2-rank stages are skipped. lmcore logs every 10 steps, like the original
# here. Runs with the same compile options share an inductor cache (the 2-rank runs compile
# the 1-GPU graph again: a cache hit). Then benchmarks/speed_report.py
# prints the table (card, kernel, ranks, step ms, tokens/s per GPU, MFU, ratios to the original
# with FA3 and FA2), the profiles' breakdowns and the same math (every 1-GPU run's losses
# against "before", the twin's giving the noise). STAGES picks stages (default: all, in the
# order above). BEFORE, LEVERS, SOLO: --set overrides; the three go to res/levers.json. Set and empty,
# one means no overrides (BEFORE="": today's defaults); unset, its default below.
# Durations: on nvidia-h200-x2 (session 7) 1,272 s: setup 22 s, the originals' pair 284 s,
# the lm1 pairs 256 and 251 s, kernel sources 11 s, the 2-rank original 200 s, lm_after_2 116 s,
# lm_before_2 134 s (LM2=after leaves `before` out). On nvidia-h200 (session 6, one at a time) 1,363 s: setup 25 s, original FA3 230 s,
# each lmcore run 220-235 s (the twin 180 s: a cache hit), original FA2 236 s. Either way most
# of a session's 1,800 s of device time, plus the machine's start. Session 8 on nvidia-h200 with
# STAGES="peak orig1 lm1" ONE_GPU_RUNS="orig_fa3_1 lm_after_1 lm_solo_1": 691 s (setup 22 s,
# original 242 s, after 217 s, solo 199 s).
# Session 9 on nvidia-h200 with ONE_GPU_RUNS="orig_fa3_1 lm_solo_1" and two VARIANTS (graphs,
# autotune): 1,257 s (original 245 s, solo 194 s, reduce-overhead 203 s, max-autotune 580 s).
# Session 10 on nvidia-h200: ONE_GPU_RUNS="orig_fa3_1 lm_solo_1" and two VARIANTS (expand_kv,
# solo's twin): 792 s (original 203 s, solo 187 s, each variant 186-193 s); ONE_GPU_RUNS="orig_fa3_1
# lm_after_1" and one variant: 703 s (original 236 s, after 205 s, the variant 227 s).
# Session 14 on nvidia-h200: ONE_GPU_RUNS="orig_fa3_1 lm_solo_1" and two VARIANTS: 743 s (setup 18 s,
# original 191 s, solo 175 s, the variants 172 and 180 s). Session 16 on nvidia-h200: the same shape, 896 s
# (setup 25 s, original 251 s, solo 196 s, the variants 211 and 200 s); peak now adds 20 s (--sustain 20).
# Session 18 on nvidia-h200, the same shape: 918 s (setup 21 s, peak 27 s, original 275 s, solo 191 s, the
# variants 194 and 201 s).
# Session 19 on nvidia-h200-x2 with STAGES="peak orig2 lm2" LM2="after nographs": 509 s (setup 16 s, peak 25 s,
# the 2-rank original 224 s, lm_after_2 118 s, lm_v_nographs_2 116 s, report 10 s).
# Session 20 on nvidia-h200-x2, all stages: setup 21 s, peak 26 s, the originals' pair 276 s; then the job hung
# (a bare `wait` waited for the clocks sampler; pairs now run with detached.sh's `both`).
# Session 21 on nvidia-h200-x2, all stages (LM2=after, one variant): 1,333 s (setup 20 s, peak 27 s, the originals'
# pair 275 s, the lm1 pairs 252 and 223 s, the variant 195 s, the 2-rank original 222 s, lm_after_2 108 s,
# report 11 s). STAGES=lm2 LM2=before alone: 165 s.
# Session 22 on nvidia-h200-x2, all stages (LM2="after solo before", no variant): 1,337 s (setup 18 s, peak 26 s,
# the originals' pair 272 s, the lm1 pairs 247 and 213 s, the 2-rank original 200 s, lm_after_2 107 s, lm_solo_2
# 108 s, lm_before_2 135 s, report 11 s).
# Session 25 on nvidia-h200-x2 (LM1_PAIRS=after, LM2=after): setup 21 s, peak 26 s, the originals' pair 291 s, the
# lm1 pair 224 s, the 2-rank original 233 s; the device time ran out as lm_after_2 started. The `cuda` tests run
# in the same call before `start` took 197 s on the fresh machine (compiles): budget them.
# Session 26 on nvidia-h200-x2 (LM1_PAIRS=after, LM2="after solo", LM_FA3_WHL the FA3_DPSUM build): 1,081 s (setup
# 28 s, peak 26 s, the originals' pair 305 s, the lm1 pair 228 s, the 2-rank original 255 s, lm_after_2 113 s,
# lm_solo_2 112 s, report 14 s). STAGES=lm2 LM2="after solo" alone: 239 s.
# It outlasts one device call: `start` runs it detached (benchmarks/detached.sh) and polls;
# `poll` (the next call, within 30 s of the last) goes on. Carry .whl, .data, .ref and .fa3.
# Each poll leaves $OUT/speed.log, and once done $OUT/speed_table.md and
# $OUT/speed_results.tgz (logs, summaries, metrics, the profiles' breakdowns and traces, the
# kernels' sources).
# All along, nvidia-smi samples GPU 0's clocks and power every 500 ms (res/clocks.csv), and
# energy_sample.py its energy counter (res/energy.csv: clocks_report's counter W column); the report
# ends with them by stage (benchmarks/clocks_report.py: res/clocks.md), to tell a step held back
# by the card's power limit from one held back by its kernels, and with the samples taken during
# each profiled step on GPU 0 (whether the profile ran at the steady steps' clock).
#   bash benchmarks/speed.sh start [POLL_S]  |  bash benchmarks/speed.sh poll [POLL_S]
set -uo pipefail
S=/tmp/speed
MODE=${1:-poll}
POLL_S=${2:-540}
STEPS=${STEPS:-40}
MATH_STEPS=${MATH_STEPS:-200}
SOLO_STEPS=${SOLO_STEPS:-$MATH_STEPS}
STAGES=${STAGES:-peak orig1 lm1 orig2 lm2}
BEFORE=${BEFORE-train.rope_cache=false train.inductor_mix_order_reduction=true}
LEVERS=${LEVERS-train.ddp_bucket_cap_mb=100 train.ddp_grad_as_bucket_view=true}
SOLO=${SOLO-train.fused_qk_norm_rope=true train.fused_xsa_gate=true}
# on a 1-GPU machine, the 1-GPU runs and their order (names of the functions below)
ONE_GPU_RUNS=${ONE_GPU_RUNS:-orig_fa3_1 lm_before_1 lm_after_1 lm_solo_1 lm_before_1b orig_fa2_1}
SOLO_TIMEOUT=${SOLO_TIMEOUT:-420}  # the solo run is ended after this many seconds (compile included)
VARIANTS=${VARIANTS:-}  # "NAME:overrides;NAME:overrides": more lmcore runs after lm1 (empty: none)
VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-600}
VARIANTS_1GPU=${VARIANTS_1GPU:-1}  # 0: the VARIANTS run only where LM2 names them (2-rank levers), not in lm1
LM2=${LM2:-after before}  # the 2-rank lmcore runs in order: after, before or a VARIANTS name
LM1_PAIRS=${LM1_PAIRS:-before after}  # the 1-GPU pairs on 2 GPUs: before (+ its twin), after (+ solo)
# a wheel (path or glob) of another FA3 build for lmcore's runs only, e.g. FA3_DPSUM=1 scripts/build_fa3.sh's
# for train.fa3_xsa_rowsum; the originals keep .fa3/dist's. Empty: lmcore runs on .fa3/dist's too
LM_FA3_WHL=${LM_FA3_WHL:-}

source benchmarks/detached.sh  # stamp, run_until, detached_poll, detached_main

has() { [[ " $STAGES " == *" $1 "* ]]; }

# orig NAME GPUS NPROC SCRIPT_DIR PYTHONPATH: the original for STEPS steps, stopped after its
# last step line (it would go on to calibration); log in $R/NAME.log
orig() {
  local name=$1 gpus=$2 nproc=$3 dir=$4 pp=$5 log=$R/$1.log
  echo "== $name (GPU $gpus, $((SECONDS - T0)) s)"
  mkdir -p "$S/run_$name"
  (cd "$S/run_$name" && run_until 600 "$log" "step:$STEPS/$STEPS val_loss" env CUDA_VISIBLE_DEVICES="$gpus" \
    DATA_PATH="$D" TOKENIZER_PATH="$TOK" ITERATIONS="$STEPS" WARMDOWN_ITERS=0 MAX_WALLCLOCK_SECONDS=0 SEED=1337 \
    TTT_ENABLED=0 TRAIN_LOG_EVERY=10 RUN_ID="$name" PYTHONPATH="$pp" \
    python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$dir/seed_train_gpt.py")
  grep -E "step:$STEPS/$STEPS|Traceback|Error" "$log" | head -3
}

# lm NAME CACHE GPUS NPROC STEPS [--set ...]: lmcore train into $R/NAME (log $R/NAME.log), inductor's
# cache in $S/inductor/CACHE
lm() {
  local name=$1 cache=$2 gpus=$3 nproc=$4 n=$5
  shift 5
  echo "== $name (GPU $gpus, $((SECONDS - T0)) s)"
  rm -rf "$R/$name"
  local launch=(python3 -m lmcore)
  [ "$nproc" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m lmcore)
  CUDA_VISIBLE_DEVICES=$gpus PYTHONPATH=$LMFA3:$BASE TORCHINDUCTOR_CACHE_DIR=$S/inductor/$cache timeout "${LM_TIMEOUT:-900}" "${launch[@]}" train \
    --preset record --set data.data_dir="$D" --set data.tokenizer="$TOK" \
    --set train.iterations="$n" --set train.warmdown_iters=0 --set train.max_wallclock_seconds=0 \
    --set train.log_every=10 --set data.val_max_tokens=262145 --set model.attention=fa3 "$@" \
    --no-progress --run-dir "$R/$name" > "$R/$name.log" 2>&1
  grep -E "done|Traceback|Error" "$R/$name.log" | tail -2
}

# sources NAME CACHE: the profiled run's top Triton kernels' sources into $R/kernels/NAME
sources() { PYTHONPATH=$BASE python3 benchmarks/kernel_sources.py "$R/$1" "$S/inductor/$2" "$R/kernels/$1"; }

sets() { local l; for l in "$@"; do printf -- '--set %s ' "$l"; done; }

# clocks_sample FILE: GPU 0's clocks, power, temperature and utilization every 500 ms into FILE (CSV)
# until killed, with the software power-cap reason under whichever name the driver knows
clocks_sample() {
  local f q="timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu"
  for f in clocks_event_reasons.sw_power_cap clocks_throttle_reasons.sw_power_cap; do
    nvidia-smi -i 0 --query-gpu="$f" --format=csv > /dev/null 2>&1 && { q="$q,$f"; break; }
  done
  exec nvidia-smi -i 0 --query-gpu="$q" --format=csv,nounits -lms 500 > "$1"
}

# the 1-GPU runs, each on the GPU given (job's prof1 and solo_prof: the steps they profile)
orig_fa3_1() { orig orig_fa3_1 "$1" 1 "$S/orig_fa3" "$FA3:$BASE"; }
orig_fa2_1() { orig orig_fa2_1 "$1" 1 "$S/src/.ref" "$BASE"; }
# shellcheck disable=SC2046,SC2086 # BEFORE, LEVERS and SOLO split into --set pairs on purpose
lm_before_1() { lm lm_before_1 before "$1" 1 "$MATH_STEPS" --set train.profile_step="$prof1" $(sets $BEFORE); }
# shellcheck disable=SC2046,SC2086
lm_before_1b() { lm lm_before_1b before "$1" 1 "$MATH_STEPS" $(sets $BEFORE); }
# shellcheck disable=SC2046,SC2086
lm_after_1() { lm lm_after_1 after "$1" 1 "$MATH_STEPS" --set train.profile_step="$prof1" $(sets $LEVERS); }
# shellcheck disable=SC2046,SC2086
lm_solo_1() { LM_TIMEOUT=$SOLO_TIMEOUT lm lm_solo_1 solo "$1" 1 "$SOLO_STEPS" --set train.profile_step="$solo_prof" $(sets $SOLO); }

# variant_sets NAME: the overrides VARIANTS gives NAME (nothing where it names none)
variant_sets() {
  local v vs
  IFS=';' read -ra vs <<< "$VARIANTS"
  for v in "${vs[@]}"; do [ "${v%%:*}" = "$1" ] && printf '%s\n' "${v#*:}"; done
  return 0
}

# lm2 NAME: one of LM2's runs on GPUs 0,1 (after, before, solo, or a variant as lm_v_NAME_2)
# shellcheck disable=SC2046,SC2086 # the overrides split into --set pairs on purpose
lm2() {
  local prof2=$((STEPS - 5)) vs
  case $1 in
    after) lm lm_after_2 after 0,1 2 "$STEPS" --set train.profile_step=$prof2 $(sets $LEVERS) ;;
    before) lm lm_before_2 before 0,1 2 "$STEPS" --set train.profile_step=$prof2 $(sets $BEFORE) ;;
    solo) lm lm_solo_2 solo 0,1 2 "$STEPS" --set train.profile_step=$prof2 $(sets $SOLO) ;;
    *)
      vs=$(variant_sets "$1")
      [ -n "$vs" ] || { echo "LM2 names $1, which is neither after, before, solo nor a VARIANTS name"; return 0; }
      LM_TIMEOUT=$VARIANT_TIMEOUT lm "lm_v_${1}_2" "v_$1" 0,1 2 "$STEPS" --set train.profile_step=$prof2 $(sets $vs) ;;
  esac
}

# each of VARIANTS: lm_v_NAME_1 on GPU 0, its profile's kernel sources beside the others
variants() {
  local v name vs
  IFS=';' read -ra vs <<< "$VARIANTS"
  for v in "${vs[@]}"; do
    name=${v%%:*}
    [ -n "$name" ] || continue
    # shellcheck disable=SC2046,SC2086 # the overrides split into --set pairs on purpose
    LM_TIMEOUT=$VARIANT_TIMEOUT lm "lm_v_${name}_1" "v_$name" 0 1 "$MATH_STEPS" --set train.profile_step="$prof1" $(sets ${v#*:})
    [ -f "$R/lm_v_${name}_1/profile/breakdown.json" ] && sources "lm_v_${name}_1" "v_$name"
  done
}

# setup: the wheels and FA3 installed, the proxy data's shards, the original's folder with FA3
setup() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --target "$FA3" .fa3/dist/*.whl
  PYTHONPATH=$FA3:$BASE python3 -c "import torch, flash_attn_interface as f; print('torch', torch.__version__, 'fa3', f.__file__)"
  if [ -n "$LM_FA3_WHL" ]; then lm_fa3_install "$LM_FA3_WHL" "$LMFA3" "$BASE" || return 1; fi  # lmcore's own FA3
  PYTHONPATH=$BASE python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer "$TOK" --out "$D" \
    --val-docs 1500 --shard-tokens 10000000 --no-progress || return 1
  # the original with real FA3: its script alone in a folder (.ref/ holds the FA2 shim)
  original_alone "$S/orig_fa3" "$FA3:$BASE"
}

job() {
  cd "$S/src" || exit 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  R=$S/res TOK=$S/src/.data/fineweb_1024_bpe.model D=$S/proxy BASE=/tmp/site:$S/src FA3=/tmp/fa3
  LMFA3=$FA3; [ -n "$LM_FA3_WHL" ] && LMFA3=/tmp/fa3lm
  T0=$SECONDS
  mkdir -p "$R"
  clocks_sample "$R/clocks.csv" &
  CLK=$!
  python3 benchmarks/energy_sample.py "$R/energy.csv" &  # the board's energy counter, for clocks_report --energy
  NRG=$!
  trap 'kill "$CLK" "$NRG" 2> /dev/null' RETURN  # a setup that fails stops the samplers too
  python3 -c 'import json, sys; print(json.dumps(dict(zip(("before", "after", "solo"), sys.argv[1:]))))' \
    "$BEFORE" "$LEVERS" "$SOLO" > "$R/levers.json"
  printf '%s\n' "$VARIANTS" > "$R/variants.txt"
  echo "== setup: stages $STAGES; STEPS $STEPS; ONE_GPU_RUNS $ONE_GPU_RUNS (one GPU); BEFORE $BEFORE; LEVERS $LEVERS; SOLO $SOLO; VARIANTS $VARIANTS; LM2 $LM2 (2 ranks); LM_FA3_WHL ${LM_FA3_WHL:-(.fa3/dist)}"
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  setup || return 1
  local n_gpu; n_gpu=$(nvidia-smi -L | wc -l)
  local prof1=$((MATH_STEPS - 5)) solo_prof=$((SOLO_STEPS - 5)) r
  # shellcheck disable=SC2046,SC2086 # LEVERS and SOLO split into --set pairs on purpose
  {
    has peak && echo "== peak ($((SECONDS - T0)) s)" && PYTHONPATH=$BASE python3 benchmarks/matmul_peak.py --json "$R/peak.json" --sustain 20
    if [ "$n_gpu" -ge 2 ]; then
      has orig1 && both "orig_fa3_1 0" "orig_fa2_1 1"
      if has lm1; then
        local pair
        for pair in $LM1_PAIRS; do
          case $pair in before) both "lm_before_1 0" "lm_before_1b 1" ;; after) both "lm_after_1 0" "lm_solo_1 1" ;; esac
        done
      fi
    else  # one GPU: one at a time, ONE_GPU_RUNS of the stages picked, in its order
      local run
      for run in $ONE_GPU_RUNS; do
        case $run in orig_*) has orig1 && "$run" 0 ;; lm_*) has lm1 && "$run" 0 ;; esac
      done
    fi
    if has lm1; then
      local c
      for c in before after solo; do [ -f "$R/lm_${c}_1/profile/breakdown.json" ] && sources "lm_${c}_1" "$c"; done
      [ "$VARIANTS_1GPU" = 1 ] && variants
    fi
    if [ "$n_gpu" -ge 2 ]; then
      has orig2 && orig orig_fa3_2 0,1 2 "$S/orig_fa3" "$FA3:$BASE"
      if has lm2; then for r in $LM2; do lm2 "$r"; done; fi
    else
      echo "== one GPU: the 2-rank stages are skipped"
    fi
  } || true
  echo "== report ($((SECONDS - T0)) s)"
  kill "$CLK" "$NRG" 2> /dev/null
  PYTHONPATH=$BASE python3 benchmarks/speed_report.py "$R" | tee "$R/speed_table.md"
  echo "GPU 0's clocks and power by stage (benchmarks/clocks_report.py; median over samples at >= 90% utilization):"
  local energy=(); [ "$(wc -l < "$R/energy.csv" 2> /dev/null || echo 0)" -gt 2 ] && energy=(--energy "$R/energy.csv")
  PYTHONPATH=$BASE python3 benchmarks/clocks_report.py "$R/clocks.csv" "$S/job.log" --profiles "$R" "${energy[@]}" \
    | tee "$R/clocks.md"
  echo "== done ($((SECONDS - T0)) s)"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$S/job.log" "$OUT/speed.log" 2>/dev/null
  cp "$S/res/speed_table.md" "$OUT/" 2>/dev/null
  [ -d "$S/res" ] && tar -C "$S" -czf "$OUT/speed_results.tgz" --exclude='*.pt' --exclude=checkpoints res
  return 0
}

detached_main benchmarks/speed.sh "SPEED" "$MODE" || exit $?
