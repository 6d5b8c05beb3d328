"""The whole pipeline, timed wall-clock as a user runs it, recorded as one JSON file.

    python -m benchmarks.gpu_pipeline --preset seed-gpu --archive A --cache C --work W --out OUT
        [--nproc N] [--cold] [--tag T] [section.field=value ...]

Runs `torchrun --standalone --nproc_per_node=N -m kd_ddp pipeline` (teacher -> logits cache
-> both students -> report) in a fresh run dir and writes
`OUT/pipeline-<card>[-<T>][-<N>gpu][-cold].json` (`-<T>`: `--tag T`, e.g. `strong` for that
preset's run) with the card, the wall-clock seconds (process start to exit: interpreter,
CUDA and NCCL start-up, data loading, every stage, the report), whether the prepared data
was already cached (`--cold` prepares it from the JPEG archive in an empty cache first:
counted), the three test accuracies and each stage's time and images/s. On a machine
without a GPU the card is "cpu" (how the test suite runs it, on the smoke preset).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kd_ddp.report import RUNS


def card_name() -> str:
    """`nvidia-h200` for 'NVIDIA H200', `nvidia-h100-80gb-hbm3` ...; `cpu` without a GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


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
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    results = json.loads((run_dir / "report" / "results.json").read_text())
    stages = {key: json.loads((run_dir / sub / "summary.json").read_text()) for key, sub in RUNS.items()}
    cache_manifest = run_dir / "teacher-logits" / "manifest.json"
    return {
        "card": card_name(), "nproc": nproc, "preset": preset, "overrides": overrides or [],
        "wall_s": round(wall, 2), "warm_data": not cold,
        "teacher_acc": results["teacher"]["test_acc"],
        "student_normal_acc": results["student_normal"]["test_acc"],
        "student_kd_acc": results["student_kd"]["test_acc"],
        "stages": {key: {k: s.get(k) for k in ("train_time_s", "session_time_s", "images_per_s", "epochs", "amp",
                                                 "loader", "world_size", "backend", "peak_cuda_mb", "model")}
                   for key, s in stages.items()},
        "cache_build_s": json.loads(cache_manifest.read_text())["build_time_s"] if cache_manifest.is_file() else None,
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "run_dir": str(run_dir),
    }


def out_name(row: dict[str, Any], tag: str = "") -> str:
    gpus = f"-{row['nproc']}gpu" if row["nproc"] > 1 else ""
    return f"pipeline-{row['card']}{'-' + tag if tag else ''}{gpus}{'' if row['warm_data'] else '-cold'}.json"


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
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
