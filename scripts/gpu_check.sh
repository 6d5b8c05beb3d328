#!/usr/bin/env bash
# The GPU check, as one script for one short slot on a bare GPU machine (~5 min of its ~8;
# figures go to BENCHMARKS.md and benchmarks/gpu/). Steps, in order:
#   env     versions, GPUs, CPUs (env.txt)
#   smoke   the smoke pipeline under `torchrun --nproc_per_node=1`: NCCL group, DDP, CUDA
#           autocast, device-resident data (stops the script if it fails: nothing after it
#           would work either)
#   cold    the seed-gpu pipeline (teacher, cache, both students, report) from the JPEG
#           archive with an empty data cache: pipeline-<card>-cold.json (target <= 45 s)
#   warm    the same with the prepared data cached: pipeline-<card>.json (target <= 30 s)
#   limit   per stage, a real epoch vs the same train_step calls on one in-memory batch,
#           seed-gpu preset (targets: <= 1.15, teacher >= 120k img/s)
#   step    the teacher's train_step at batch 256, 1024 and 4096: fp32 / channels_last / bf16 / fp16
#   multi   with more than one GPU: the warm pipeline on all of them (scaling, same accuracies)
#   strong  OPTIONAL, not in the default STEPS (it needs most of one 10-minute call): the
#           `strong` preset's whole pipeline (torchvision ResNet-18 teacher with the CIFAR stem
#           -> cache -> student_cnn normal and KD -> report): pipeline-<card>-strong.json
#           (targets: teacher >= 0.94, the KD student's gain over the normal one, the times).
#           Alone, in a call of timeout_s=600: STEPS="env strong" BUDGET_S=570 OUT=... bash scripts/gpu_check.sh
# Usage: OUT=/tmp/gpu-check bash scripts/gpu_check.sh   (the device tool: OUT is its $OUT)
# Every step gets what is left of BUDGET_S (default 420 s); logs and JSON go to $OUT.
# A dry run of the script's logic on a CPU, in a minute:
#   PRESET=smoke STEPS="env cold warm limit" OUT=/tmp/gc bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
STEPS=${STEPS:-env smoke cold warm limit step multi}
PRESET=${PRESET:-seed-gpu}
BUDGET_S=${BUDGET_S:-420}
PY=${PY:-python3}
ARCHIVE=${ARCHIVE:-.gpu/cifar10-jpeg.tar.gz}
[ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
RUNS=${RUNS:-/tmp/kd-gpu-runs}
CACHE=$RUNS/cache
mkdir -p "$OUT" "$RUNS"
if [ -d .gpu/site ]; then  # packages the host lacks (scripts/gpu_bundle.sh)
  export PYTHONPATH="$PWD/.gpu/site:$PWD" LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 KD_DDP_CACHE=$CACHE NCCL_DEBUG=${NCCL_DEBUG:-WARN}
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)

step() {  # step NAME LIMIT_S CMD...: run with what is left of the budget, log to $OUT/NAME.log
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 20 ]; then echo "$name skipped: budget spent" | tee -a "$OUT/steps.txt"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $(date +%T) $name (at most ${limit} s)"
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1  # -k: SIGKILL what a SIGTERM leaves (a torchrun child checkpointing)
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.log"
  return $rc
}
keep_run() {  # a run dir without weights and logits, as one file
  [ -d "$1" ] && tar -C "$(dirname "$1")" -czf "$OUT/$2-run.tar.gz" --exclude='*.pt' --exclude='logits.npy' \
    --exclude='*.lock' "$(basename "$1")"
}
pipeline() {  # pipeline NAME LIMIT_S NPROC [--cold]
  local name=$1 limit=$2 nproc=$3
  shift 3
  step "$name" "$limit" "$PY" -m benchmarks.gpu_pipeline --preset "$PRESET" --archive "$ARCHIVE" --cache "$CACHE" \
    --work "$RUNS" --out "$OUT" --nproc "$nproc" "$@"
  local rc=$?
  keep_run "$RUNS/pipeline-$PRESET-$nproc${1:+-cold}" "$name"
  return $rc
}

for s in $STEPS; do
  case $s in
    env) { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
           echo "cpus $(nproc)"
           "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None,
      "gpus", torch.cuda.device_count())
EOF
         } > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt" ;;
    smoke) step smoke 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m kd_ddp pipeline \
             --preset smoke run.dir="$RUNS/smoke" tracking.wandb.mode=disabled train.device=cuda \
             || { keep_run "$RUNS/smoke" smoke; exit 1; } ;;
    cold) pipeline cold 150 1 --cold ;;
    warm) pipeline warm 120 1 ;;
    limit) step limit 120 "$PY" -m benchmarks --only compute_limit --limit-preset "$PRESET" --data-root "$ARCHIVE" \
             --cache-dir "$CACHE" --out "$OUT/limit" ;;
    step) for b in 256 1024 4096; do
            step "step-$b" 60 "$PY" -m benchmarks --only train_step --batch "$b" --cache-dir "$CACHE" --out "$OUT/step-$b"
          done ;;
    strong) step strong 540 "$PY" -m benchmarks.gpu_pipeline --preset strong --archive "$ARCHIVE" --cache "$CACHE" \
              --work "$RUNS" --out "$OUT" --nproc 1 --tag strong
            keep_run "$RUNS/pipeline-strong-1" strong ;;
    multi) if [ "$NGPU" -gt 1 ]; then pipeline "multi-$NGPU" 150 "$NGPU"; else echo "multi skipped: $NGPU GPU" \
             | tee -a "$OUT/steps.txt"; fi ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "== done in $SECONDS s"; cat "$OUT/steps.txt"
