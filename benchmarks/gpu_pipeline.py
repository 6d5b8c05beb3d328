"""The whole pipeline, timed wall-clock as a user runs it, recorded as one JSON file.

    python -m benchmarks.gpu_pipeline --preset seed-gpu --archive A --cache C --work W --out OUT
        [--nproc N] [--cold] [--tag T] [section.field=value ...]

Runs `torchrun --standalone --nproc_per_node=N -m kd_ddp pipeline` (teacher -> logits cache
-> both students -> report) in a fresh run dir, its output streamed to `W/<run dir>.log` (a
run killed at its time limit keeps what it printed), and writes
`OUT/pipeline-<card>[-<T>][-<N>gpu][-cold].json` (`-<T>`: `--tag T`, e.g. `strong` for that
preset's run; `-cold`: `--cold` was asked for) with the card, the two whole-run times
(`wall_s` around the command, `pipeline_s` the pipeline's own timer: see TIME_LEGEND, which
the record carries), whether the prepared data was found in the cache (read from the run's
log), the three test accuracies, and per stage its times, images/s and the host syncs of an
epoch (HOST_SYNCS). On a machine without a GPU the card is "cpu" (how the test suite runs
it, on the smoke preset).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kd_ddp import stages
from kd_ddp.metrics_io import read_metrics
from kd_ddp.report import RUNS

# What each time of the record includes (kd_ddp/cli.py and kd_ddp/train.py measure them).
TIME_LEGEND = {
    "wall_s": "the whole torchrun command, process start to exit: interpreter and torch import, torchrun and "
              "process-group start, then everything pipeline_s counts, then exit",
    "pipeline_s": "the pipeline's own timer (its log line 'pipeline finished in X s', as the H100 run's 131.6 s): "
                  "data preparation or finding it, the three stages with their setup, the logits cache, the "
                  "report; not the interpreter, imports, torchrun or process-group start",
    "stages.*.train_steps_s": "sum over epochs of epoch_time_s: the training steps and the flag reads between "
                              "them, up to the host reading the epoch's loss sums; no evaluation, no checkpoint",
    "stages.*.eval_s": "sum over epochs of eval_time_s: the BatchNorm buffer broadcast and the test-set "
                       "evaluation after each epoch",
    "stages.*.train_time_s": "train_steps_s + eval_s (the stage summary's train_time_s): no checkpoints",
    "stages.*.session_time_s": "the stage's epoch loop: train_time_s plus each epoch's checkpoint, metrics.jsonl "
                               "line and barrier; not the model build, data loading onto the device or resume",
    "stages.*.checkpoint_and_log_s": "session_time_s - train_time_s",
    "cache_build_s": "the teacher-logits cache (its manifest's build_time_s), between the teacher and the students",
}

# The host syncs of one training epoch, as kd_ddp/train.py makes them (Trainer.run_epoch,
# check, evaluate, save): the host waits on the device only at these points.
HOST_SYNCS = ("ceil(steps / check_every) x (1 flag read + 1 stop-flag sum under a process group) "
              "+ 1 epoch loss sums + 1 evaluation sums + 1 checkpoint (RNG states gathered, weights copied "
              "to the host) + 1 end-of-epoch barrier under a process group")

STAGE_LINE = re.compile(
    r"(?P<stage>[\w-]+): (?P<epochs>\d+) epochs x (?P<steps>\d+) steps, global batch (?P<batch>\d+) on "
    r"(?P<ranks>\d+) rank\(s\) \(process group: (?P<group>\w+)\).*flags read every (?P<check>\d+) step")


def card_name() -> str:
    """`nvidia-h200` for 'NVIDIA H200', `nvidia-h100-80gb-hbm3` ...; `cpu` without a GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def host_syncs(steps: int, check_every: int, process_group: bool) -> dict[str, Any]:
    """The host syncs of one epoch of `steps` steps, each part named (HOST_SYNCS)."""
    checks = math.ceil(steps / check_every)
    parts = {"flag_reads": checks, "stop_flag_sums": checks if process_group else 0, "epoch_sums": 1,
             "eval_sums": 1, "checkpoint": 1, "barrier": 1 if process_group else 0}
    return {"per_epoch": sum(parts.values()), "parts": parts, "steps": steps, "check_every": check_every}


def read_log(text: str) -> dict[str, Any]:
    """What the run's own log says: the pipeline's timer, whether the prepared data was found
    (None: neither line, e.g. a run that stopped before its data), each stage's loop facts."""
    timer = re.search(r"pipeline finished in ([\d.]+) s", text)
    found, prepared = "prepared data found in" in text, re.search(r"preparing \w+ data from", text) is not None
    stages = {}
    for m in STAGE_LINE.finditer(text):
        group = m["group"] != "none"
        stages[m["stage"]] = {"epochs": int(m["epochs"]), "ranks": int(m["ranks"]), "process_group": m["group"],
                              "host_syncs": host_syncs(int(m["steps"]), int(m["check"]), group)}
    return {"pipeline_s": float(timer.group(1)) if timer else None,
            "warm_data": True if found and not prepared else False if prepared else None, "stages": stages}


def stage_record(run_dir: Path, sub: str, facts: dict[str, Any]) -> dict[str, Any]:
    """One stage's figures, each time named by what it includes (TIME_LEGEND)."""
    s = json.loads((run_dir / sub / "summary.json").read_text())
    epochs = read_metrics(run_dir / sub / "metrics.jsonl")
    train_steps = sum(r["epoch_time_s"] for r in epochs)
    evals = sum(r.get("eval_time_s", 0.0) for r in epochs)
    row = {k: s.get(k) for k in ("train_time_s", "session_time_s", "images_per_s", "epochs", "amp", "loader",
                                 "world_size", "backend", "peak_cuda_mb", "model")}
    row.update(train_steps_s=round(train_steps, 3), eval_s=round(evals, 3),
               checkpoint_and_log_s=round(s["session_time_s"] - s["train_time_s"], 3),
               host_syncs_per_epoch=facts.get("host_syncs", {}).get("per_epoch"),
               host_syncs=facts.get("host_syncs"))
    return row


def run_teed(cmd: list[str], log: Path) -> int:
    """Run `cmd`, its output line by line into `log` and onto stdout: a run killed at its time
    limit leaves both behind (the check's step log and the run's own)."""
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.returncode


def run(preset: str, archive: str, cache: Path, work: Path, nproc: int = 1, cold: bool = False,
        overrides: list[str] | None = None) -> dict[str, Any]:
    run_dir = work / f"pipeline-{preset}-{nproc}{'-cold' if cold else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    if cold:
        shutil.rmtree(cache, ignore_errors=True)  # data preparation from the archive is part of the time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kd_ddp", "pipeline", "--preset", preset, f"run.dir={run_dir}", f"data.cache_dir={cache}",
           "tracking.wandb.mode=disabled", "tracking.progress=false",
           *([f"data.root={archive}"] if archive else []), *(overrides or [])]
    log = work / f"{run_dir.name}.log"
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = run_teed(cmd, log)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc} (log: {log})")
    return record(run_dir, text, wall, preset, nproc, cold, overrides or [])


def record(run_dir: Path, log_text: str, wall: float, preset: str, nproc: int, cold: bool,
           overrides: list[str]) -> dict[str, Any]:
    results = json.loads((run_dir / stages.REPORT.name / "results.json").read_text())
    facts = read_log(log_text)
    cache_manifest = run_dir / stages.CACHE.name / "manifest.json"
    return {
        "card": card_name(), "nproc": nproc, "preset": preset, "overrides": overrides,
        "wall_s": round(wall, 2), "pipeline_s": facts["pipeline_s"],
        "warm_data": facts["warm_data"], "cold_requested": cold,
        **{f"{stage.key}_acc": results[stage.key]["test_acc"] for stage in stages.TRAINED},
        "stages": {key: stage_record(run_dir, sub, facts["stages"].get(sub, {})) for key, sub in RUNS.items()},
        "cache_build_s": json.loads(cache_manifest.read_text())["build_time_s"] if cache_manifest.is_file() else None,
        "host_syncs_formula": HOST_SYNCS, "time_legend": TIME_LEGEND,
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "run_dir": str(run_dir),
    }


def out_name(row: dict[str, Any], tag: str = "") -> str:
    """Named by what was asked for (--cold), not by what the log found: a warm run that found
    no prepared data must not overwrite the cold run's record."""
    gpus = f"-{row['nproc']}gpu" if row["nproc"] > 1 else ""
    return f"pipeline-{row['card']}{'-' + tag if tag else ''}{gpus}{'-cold' if row['cold_requested'] else ''}.json"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pipeline")
    p.add_argument("--preset", default="seed-gpu")
    p.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz", help="data.root ('' = the preset's)")
    p.add_argument("--cache", required=True, help="data cache dir (emptied first with --cold)")
    p.add_argument("--work", required=True, help="where the run dir and its log go")
    p.add_argument("--out", required=True, help="where pipeline-<card>*.json goes")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="prepare the data from the archive inside the timed run")
    p.add_argument("--tag", default="", help="added to the record's name (pipeline-<card>-<tag>.json)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    row = run(a.preset, a.archive, Path(a.cache), work, a.nproc, a.cold, a.overrides)
    (out / out_name(row, a.tag)).write_text(json.dumps(row, indent=1) + "\n")
    print(f"{out / out_name(row, a.tag)}: wall {row['wall_s']} s, in-process {row['pipeline_s']} s, warm_data "
          f"{row['warm_data']}, teacher {row['teacher_acc']}, normal {row['student_normal_acc']}, "
          f"KD {row['student_kd_acc']}")


if __name__ == "__main__":
    main()
