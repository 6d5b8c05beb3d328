#!/usr/bin/env bash
# Reproduce results/: the seed preset on full CIFAR-10 for 3 seeds, a 3x3 KD sweep and a
# live-teacher KD run, then the report. Every step is a plain `kd-ddp` command; rerunning
# skips what is finished and resumes what was interrupted.
#
#   bash scripts/reproduce_results.sh [section.field=value ...]
#   STEPS="sweep live" bash scripts/reproduce_results.sh    # some of: seeds sweep live report publish
#   STEPS="ensemble ensemble-publish" bash scripts/reproduce_results.sh   # results/ensemble/
#
# `ensemble` is a campaign of its own, on the quick preset (ENS_PRESET): an ensemble of
# ENS_SIZE teachers per seed, its KD student beside the single-teacher KD student and the
# normal student of the same seed (paired), in ENS_WORK; `ensemble-publish` copies it to
# results/ensemble/ (no checkpoints or caches) and builds its report there. About 25 min
# per seed on a 2-core CPU with the machine to itself.
#
# Hours on a 2-core CPU (per seed: teacher ~45 min, cache ~5 min, two students ~5 min each);
# minutes on a GPU. WORK (default runs/results) holds checkpoints and caches; `publish`
# copies everything but those into results/ (the committed tree) and rebuilds its report
# there, as `kd-ddp report --preset seed run.dir=results` does from a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-runs/results}
KD=${KD:-.venv/bin/kd-ddp}
SEEDS=${SEEDS:-"0 1 2"}
ALPHAS=${ALPHAS:-"0.1 0.5 0.9"}
TEMPS=${TEMPS:-"2 4 8"}
SWEEP_EPOCHS=${SWEEP_EPOCHS:-10}
COMMON=(--preset seed "tracking.wandb.mode=${WANDB_MODE:-offline}" "$@")
steps=${STEPS:-"seeds sweep live report publish"}
ENS_WORK=${ENS_WORK:-runs/ensemble-results}
ENS_PRESET=${ENS_PRESET:-quick}
ENS_SIZE=${ENS_SIZE:-3}
ENS_COMMON=(--preset "$ENS_PRESET" "kd.ensemble=$ENS_SIZE" "tracking.wandb.mode=${WANDB_MODE:-offline}" "$@")

# The sweep and the live run train KD students against seed 0's teacher (and cache): their
# run dirs link to it, as the Slurm sweep does (launch/plan.py).
link_teacher() {  # DIR [with-cache]
    mkdir -p "$1"
    ln -sfn "$(realpath --relative-to="$1" "$WORK/teacher")" "$1/teacher"
    if [[ ${2:-} == with-cache ]]; then
        ln -sfn "$(realpath --relative-to="$1" "$WORK/teacher-logits")" "$1/teacher-logits"
    fi
}

for step in $steps; do
    case $step in
    seeds)
        for s in $SEEDS; do
            dir=$WORK; [[ $s == 0 ]] || dir=$WORK/seeds/$s
            "$KD" pipeline "${COMMON[@]}" "seed=$s" "run.dir=$dir"
        done ;;
    sweep)
        for a in $ALPHAS; do
            for t in $TEMPS; do
                dir=$WORK/sweep/a$a-t$t
                link_teacher "$dir" with-cache
                "$KD" train-student --mode kd "${COMMON[@]}" seed=0 "run.dir=$dir" "kd.alpha=$a" \
                    "kd.temperature=$t" "optim.student_epochs=$SWEEP_EPOCHS"
            done
        done ;;
    live)
        dir=$WORK/variants/live-teacher
        link_teacher "$dir"
        "$KD" train-student --mode kd "${COMMON[@]}" seed=0 "run.dir=$dir" kd.teacher=live ;;
    report)
        "$KD" report "${COMMON[@]}" "run.dir=$WORK" ;;
    publish)
        # metrics, summaries, configs, the cache manifest: no checkpoints, caches, W&B logs
        # results/ is replaced by WORK: refuse a WORK that lacks seed 0 (the run dir itself)
        [[ -f $WORK/teacher/summary.json ]] || { echo "publish: $WORK has no finished seed-0 teacher;" \
            "results/ is replaced by WORK, so run the seed-0 pipeline there first" >&2; exit 2; }
        # everything but results/ensemble/ (the ensemble campaign's, published on its own)
        mkdir -p results && find results -mindepth 1 -maxdepth 1 ! -name ensemble -exec rm -rf {} +
        tar -C "$WORK" --exclude='*.pt' --exclude=logits.npy --exclude=wandb --exclude='.kd-ddp*.lock' \
            --exclude='*.tmp*' --exclude=report -cf - . | tar -C results -xf -
        find results -type l -delete  # the sweep's links to the teacher: the report does not need them
        "$KD" report "${COMMON[@]}" "run.dir=results" tracking.wandb.mode=disabled ;;
    ensemble)
        for s in $SEEDS; do
            dir=$ENS_WORK; [[ $s == 0 ]] || dir=$ENS_WORK/seeds/$s
            "$KD" pipeline "${ENS_COMMON[@]}" "seed=$s" "run.dir=$dir"
        done ;;
    ensemble-publish)
        [[ -f $ENS_WORK/student-kd-ensemble/summary.json ]] || { echo "ensemble-publish: $ENS_WORK has no" \
            "finished seed-0 ensemble student; run STEPS=ensemble first" >&2; exit 2; }
        rm -rf results/ensemble && mkdir -p results/ensemble
        tar -C "$ENS_WORK" --exclude='*.pt' --exclude=logits.npy --exclude=wandb --exclude='.kd-ddp*.lock' \
            --exclude='*.tmp*' --exclude=report -cf - . | tar -C results/ensemble -xf -
        "$KD" report "${ENS_COMMON[@]}" "run.dir=results/ensemble" tracking.wandb.mode=disabled ;;
    *) echo "unknown step $step (seeds sweep live report publish ensemble ensemble-publish)" >&2; exit 2 ;;
    esac
done
