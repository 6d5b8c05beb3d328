"""DDP scaling and per-stage memory, each stage in its own process (as users run them).

DDP: `torchrun --nproc_per_node=2` with 1 thread per process vs 1 process with 1 thread,
teacher training on the same data and global batch; images/s of the last epoch.
Memory: peak RSS of each stage run alone (`kd-ddp <stage>` in a fresh process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kd_ddp import stages
from kd_ddp.metrics_io import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = ["--preset", "smoke", "data.synthetic_train=8192", "data.synthetic_test=1024",
        "model.teacher=teacher_cnn_lite", "model.teacher_width=32", "model.teacher_hidden=256",
        "model.student_width=16", "model.student_hidden=256", "optim.batch_size=256", "optim.epochs=2",
        "tracking.wandb.mode=disabled", "tracking.progress=false", "kd.views=2"]


def _kd_ddp(args: list[str], nproc: int = 1) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "kd_ddp", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])


def _summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "summary.json").read_text())


def _last_rate(run_dir: Path, stage: str) -> float:
    return read_metrics(run_dir / stage / "metrics.jsonl")[-1]["images_per_s"]


def run(work: Path, cache_dir: Path) -> dict[str, Any]:
    rates: dict[str, float] = {}
    for nproc in (1, 2):
        run_dir = work / f"ddp{nproc}"
        _kd_ddp([stages.TEACHER.command, *DATA, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.threads=1"],
                nproc)
        rates[f"{nproc}x1"] = _last_rate(run_dir, stages.TEACHER.name)
    mem_dir = work / "mem"
    memory = {}
    for stage in stages.PIPELINE[1:-1]:  # one command per stage, from the teacher to the KD student
        mode = ["--mode", stage.mode] if stage.mode else []
        _kd_ddp([stage.command, *mode, *DATA, f"run.dir={mem_dir}", f"data.cache_dir={cache_dir}"])
    for stage in stages.TRAINED:
        memory[stage.name] = _summary(mem_dir, stage.name)["peak_rss_mb"]
    return {"images_per_s": rates, "speedup": rates["2x1"] / rates["1x1"], "peak_rss_mb": memory}


def markdown(r: dict[str, Any]) -> str:
    m = r["images_per_s"]
    mem = r["peak_rss_mb"]
    return "\n".join([
        "| teacher training (8,192 synthetic 32px images) | images/s |", "|---|---|",
        f"| 1 process x 1 thread | {m['1x1']:.0f} |", f"| torchrun 2 processes x 1 thread (gloo) | {m['2x1']:.0f} |",
        f"| **speed-up** | **{r['speedup']:.2f}x** |", "",
        "| stage (own process) | peak RSS |", "|---|---|",
        *[f"| {k} | {v:.0f} MB |" for k, v in mem.items()],
    ])
