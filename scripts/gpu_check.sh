#!/usr/bin/env bash
# The GPU check, as one script for one short slot on a GPU machine (figures: BENCHMARKS.md):
#   smoke   the smoke pipeline under `torchrun --nproc_per_node=1`: NCCL group, DDP, CUDA
#           autocast, FFCV straight to the GPU (stops the script if it fails: nothing after
#           it would work either)
#   seed    the whole seed-preset pipeline (teacher, cache, both students, report), 1 GPU
#   step    teacher step throughput, fp32 NCHW / channels_last / bf16 / fp16, and a real
#           epoch against the same steps on an in-memory batch
#   loader  FFCV + on-GPU crop/flip vs torchvision DataLoader, both delivering to the GPU
#   kd      KD student epoch: cached logits vs live teacher vs a normal student epoch
# Usage (needs .gpu/ from scripts/gpu_bundle.sh where the host cannot install FFCV):
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh
# Every step gets what is left of BUDGET_S (default 500 s); logs and results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
STEPS=${STEPS:-smoke seed step loader kd}
BUDGET_S=${BUDGET_S:-500}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
ARCHIVE=${ARCHIVE:-.gpu/cifar10-jpeg.tar.gz}
RUNS=${RUNS:-/tmp/kd-gpu-runs}
mkdir -p "$OUT" "$RUNS"
if [ -d .gpu/site ]; then
  export PYTHONPATH="$PWD/.gpu/site:$PWD" LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 KD_DDP_CACHE=${KD_DDP_CACHE:-$RUNS/cache} NCCL_DEBUG=${NCCL_DEBUG:-WARN}

step() {  # step NAME LIMIT_S CMD...: run with what is left of the budget, log to $OUT/NAME.log
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 20 ]; then echo "$name skipped: budget spent" | tee -a "$OUT/steps.txt"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $(date +%T) $name (at most ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 12 "$OUT/$name.log"
  return $rc
}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m kd_ddp)
keep_run() {  # the run dir without weights and logits, as one file ($OUT is two levels deep at most)
  [ -d "$RUNS/$1" ] && tar -C "$RUNS" -czf "$OUT/$1-run.tar.gz" --exclude='*.pt' --exclude='logits.npy' \
    --exclude='*.lock' "$1"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  nproc
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
import ffcv, numba, numpy
print("ffcv", ffcv.__version__, "numba", numba.__version__, "numpy", numpy.__version__)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for s in $STEPS; do
  case $s in
    smoke) step smoke 120 "${TORCHRUN[@]}" pipeline --preset smoke run.dir="$RUNS/smoke" train.device="$DEVICE" \
             tracking.wandb.mode=disabled || { keep_run smoke; exit 1; }
           keep_run smoke ;;
    step) step step 90 "$PY" -m benchmarks --only train_step compute_limit --data-root "$ARCHIVE" \
            --cache-dir "$KD_DDP_CACHE" --out "$OUT/step" ;;
    seed) step seed 270 "${TORCHRUN[@]}" pipeline --preset seed run.dir="$RUNS/seed" data.root="$ARCHIVE" \
            train.device="$DEVICE" tracking.wandb.mode=disabled
          keep_run seed ;;
    loader) step loader 60 "$PY" -m benchmarks --only loader --data-root "$ARCHIVE" --cache-dir "$KD_DDP_CACHE" \
              --out "$OUT/loader" ;;
    kd) step kd 120 "$PY" -m benchmarks --only kd_epoch --data-root "$ARCHIVE" --cache-dir "$KD_DDP_CACHE" \
          --out "$OUT/kd" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "== done in $SECONDS s"; cat "$OUT/steps.txt"
