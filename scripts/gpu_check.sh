#!/usr/bin/env bash
# The GPU check, as one script for one short call on a bare GPU machine (docs/gpu.md; figures
# go to BENCHMARKS.md and benchmarks/gpu/). Steps, in order:
#   env       versions of every package the pipeline imports, GPUs, CPUs
#   preflight every package in pyproject.toml's range, kd_ddp's locks taken, every module
#             imported, an operation on the GPU; at most PREFLIGHT_S (20) s. Stops the script
#             if it fails, and runs by itself before the first long step if STEPS omits it
#   smoke     the smoke pipeline under `torchrun --nproc_per_node=1`: NCCL group, DDP, CUDA
#             autocast, device-resident data (stops the script if it fails: nothing after it
#             would work either)
#   cold      the seed-gpu pipeline (teacher, cache, both students, report) from the JPEG
#             archive with an empty data cache (target wall_s <= 45)
#   warm      the same with the prepared data cached (target wall_s <= 30)
#   limit     per stage, a real epoch vs the same train_step calls on one in-memory batch,
#             seed-gpu preset (targets: <= 1.15, teacher >= 120k img/s)
#   step      the teacher's train_step at batch 256, 1024 and 4096: fp32 / channels_last / bf16 / fp16
#   graph     the teacher's step at batch 256 and 1024, bf16: the Python-number-LR step as it was,
#             the tensor-only step eager, and the same captured as a CUDA graph (train.cuda_graph)
#   ensemble  OPTIONAL, not in the default STEPS: benchmarks/ensemble.py on the GPU (quick models,
#             50,000 synthetic images): the cached and live ensemble-KD epoch against a normal one
#             for N = 1, 3, 5 (target: cached <= 1.15x normal), and the caches' build times.
#             STEPS="preflight ensemble" BUDGET_S=150, timeout_s=170
#   multi     with more than one GPU: the warm pipeline on all of them (scaling, same accuracies)
#   strong    OPTIONAL, not in the default STEPS, in a call of its own: the `strong` preset's whole
#             pipeline (ResNet-18 teacher with the CIFAR stem -> cache -> student_cnn normal and
#             KD -> report); targets: teacher >= 0.94, the KD student's gain over the normal one.
#             STEPS="preflight strong" BUDGET_S=270, timeout_s=300
# Usage: OUT=/tmp/gpu-check bash scripts/gpu_check.sh   (the device tool: OUT is its $OUT;
# the default call: timeout_s=210). Every step gets what is left of BUDGET_S (default 180 s).
#
# What comes back: the device tool returns at most 8 files of $OUT, so every log, JSON and run
# dir goes to WORK, and after every step benchmarks/gpu_summary.py rewrites in $OUT:
# summary.json, summary.txt, logs.tar.gz (WORK without weights) and the pipeline JSONs (at
# most 4): at most 7 files whatever STEPS is. summary.txt is printed at the end as well.
# Exit status 0 only when every step asked for ran and passed. A dry run of the script's
# logic on a CPU, on the smoke preset's synthetic data, in a minute or two (tests/test_gpu_check.py):
#   PRESET=smoke STEPS="env preflight cold warm limit" ARCHIVE= PREFLIGHT_S=120 BUDGET_S=900 \
#     PY=.venv/bin/python OUT=/tmp/gc bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/kd-gpu-work}       # emptied first: the summary is of this call only
CACHE=${CACHE:-/tmp/kd-gpu-cache}    # prepared data, outside WORK (not archived); `cold` empties it
STEPS=${STEPS:-env preflight smoke cold warm limit step graph multi}
PRESET=${PRESET:-seed-gpu}
BUDGET_S=${BUDGET_S:-180}
PREFLIGHT_S=${PREFLIGHT_S:-20}
PY=${PY:-python3}
ARCHIVE=${ARCHIVE-.gpu/cifar10-jpeg.tar.gz}  # ARCHIVE= (empty): the preset's own data (the smoke preset's synthetic)
[ -z "$ARCHIVE" ] || [ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
RUNS=$WORK/runs
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/logs" "$RUNS"
if [ -d .gpu/site ]; then  # packages the host lacks (scripts/gpu_bundle.sh)
  export PYTHONPATH="$PWD/.gpu/site:$PWD" LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 KD_DDP_CACHE=$CACHE NCCL_DEBUG=${NCCL_DEBUG:-WARN}
NEED_CUDA=--need-cuda
[ "$PRESET" = smoke ] && NEED_CUDA=  # the CPU dry run
printf '{"at": "%s", "t": %s}\n' "$(date -Iseconds)" "$(date +%s.%N)" > "$WORK/started.json"

event() {  # event STEP start|end|skipped [LIMIT_S] [RC] [REASON]: one line of WORK/steps.jsonl
  printf '{"step": "%s", "event": "%s", "t": %s, "limit_s": %s, "rc": %s, "reason": "%s"}\n' \
    "$1" "$2" "$(date +%s.%N)" "${3:-null}" "${4:-null}" "${5:-}" >> "$WORK/steps.jsonl"
}
summary() {  # rewrite $OUT's files from WORK (stdlib Python: works when the packages do not)
  "$PY" -m benchmarks.gpu_summary --work "$WORK" --out "$OUT" --preset "$PRESET" --budget "$BUDGET_S" "$@" \
    2>> "$WORK/logs/summary.log" || echo "(summary failed: $WORK/logs/summary.log)"
}
finish() {  # on any exit, the timed-out or killed one included: the summary as the output's last lines
  [ -z "$CURRENT" ] || event "$CURRENT" end "" 143  # stopped during a step (SIGTERM to the call)
  touch "$WORK/done"
  echo "== done in $SECONDS s"
  summary --archive --print
}
stop() {  # SIGTERM or SIGINT to the call: end the running step now, not once it has finished
  # (timeout passes the signal on to the step's processes, and SIGKILLs them 15 s later)
  [ -z "$STEP_PID" ] || { kill -TERM "$STEP_PID" 2>/dev/null; wait "$STEP_PID"; }
  exit 143
}
CURRENT= STEP_PID=  # the step running now, and its timeout's pid
trap finish EXIT
trap stop TERM INT

step() {  # step NAME LIMIT_S CMD...: run with what is left of the budget, log to WORK/logs/NAME.log
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 20 ]; then
    event "$name" skipped "" "" "budget spent"; echo "$name skipped: budget spent"; SKIPPED="$SKIPPED $name"
    summary; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $(date +%T) $name (at most ${limit} s)"
  event "$name" start "$limit"
  CURRENT=$name
  summary  # a call killed during this step still says it was running
  # -k: SIGKILL what a SIGTERM leaves (a torchrun child checkpointing). In the background and
  # waited for, so that a SIGTERM to the call reaches the step at once (see stop).
  timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  rc=$?
  CURRENT= STEP_PID=
  event "$name" end "$limit" "$rc"
  [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
  echo "$name rc=$rc $((SECONDS - t0)) s"
  tail -n 15 "$WORK/logs/$name.log"
  summary --archive
  return $rc
}
preflight() {
  PREFLIGHT_DONE=1
  step preflight $((PREFLIGHT_S + 10)) "$PY" -m benchmarks.gpu_preflight $NEED_CUDA --deadline "$PREFLIGHT_S" \
    --json "$WORK/preflight.json" || { echo "preflight failed: nothing else runs"; exit 1; }
}
pipeline() {  # pipeline NAME LIMIT_S NPROC [--cold] [ARGS...]: its JSON into WORK/NAME
  local name=$1 limit=$2 nproc=$3
  shift 3
  step "$name" "$limit" "$PY" -m benchmarks.gpu_pipeline --preset "$PRESET" --archive "$ARCHIVE" --cache "$CACHE" \
    --work "$RUNS" --out "$WORK/$name" --nproc "$nproc" "$@"
}

PREFLIGHT_DONE= FAILED= SKIPPED=
for s in $STEPS; do
  case $s in
    env|preflight) ;;
    *) [ -n "$PREFLIGHT_DONE" ] || preflight ;;  # nothing long runs on a host that lacks what it needs
  esac
  case $s in
    env) step env 30 bash -c 'if command -v nvidia-smi >/dev/null; then
             nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; else echo "no nvidia-smi"; fi
           echo "cpus $(nproc)"; "$0" -m benchmarks.gpu_preflight --list --deadline 25 --json "$1"' \
           "$PY" "$WORK/env.json" ;;
    preflight) preflight ;;
    smoke) step smoke 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m kd_ddp pipeline \
             --preset smoke run.dir="$RUNS/smoke" tracking.wandb.mode=disabled train.device=cuda \
             train.one_rank_ddp=true || exit 1 ;;
    cold) pipeline cold 90 1 --cold ;;
    warm) pipeline warm 60 1 ;;
    limit) step limit 60 "$PY" -m benchmarks --only compute_limit --limit-preset "$PRESET" --data-root "$ARCHIVE" \
             --cache-dir "$CACHE" --out "$WORK/limit" ;;
    step) for b in 256 1024 4096; do
            step "step-$b" 30 "$PY" -m benchmarks --only train_step --batch "$b" --cache-dir "$CACHE" \
              --out "$WORK/step-$b"
          done ;;
    graph) for b in 256 1024; do
             step "graph-$b" 30 "$PY" -m benchmarks --only tensor_step --batch "$b" --cache-dir "$CACHE" \
               --out "$WORK/graph-$b"
           done ;;
    strong) PRESET=strong pipeline strong 270 1 --tag strong ;;
    ensemble) step ensemble 120 "$PY" -m benchmarks.ensemble --train-images 50000 --test-images 10000 \
                --json "$WORK/ensemble/results.json" ;;
    multi) ngpu=$(timeout 30 "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
           if [ "$ngpu" -gt 1 ]; then pipeline "multi-$ngpu" 120 "$ngpu"
           else event multi skipped "" "" "$ngpu GPU"; echo "multi skipped: $ngpu GPU"; fi ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
# not 0 unless every step asked for ran and passed (a budget skip is a figure not measured)
[ -z "$FAILED$SKIPPED" ] || { echo "failed:${FAILED:- none}; skipped for the budget:${SKIPPED:- none}"; exit 1; }
