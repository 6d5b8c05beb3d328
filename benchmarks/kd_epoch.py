"""KD student epoch: cached teacher logits vs a live teacher vs a plain (normal) student epoch.

All three run the real training loop (`kd_ddp.train.train_stage`) on the same prepared data,
batch size and student, one after another in this process, repeated; each figure is the
median `epoch_time_s` of epochs after the first (the first pays FFCV's JIT compile).
The teacher is trained for one epoch only: its accuracy does not change its cost.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from kd_ddp import ensemble, stages
from kd_ddp.cli import cache_logits
from kd_ddp.config import Config, apply_overrides, from_dict, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv, setup
from kd_ddp.metrics_io import read_metrics
from kd_ddp.train import train_stage


def _epoch_times(run_dir: Path, stage: str) -> list[float]:
    return [r["epoch_time_s"] for r in read_metrics(run_dir / stage / "metrics.jsonl")[1:]]


def _student_run(cfg: Config, env: DistEnv, data: Any, stage: str, teacher_mode: str, work: Path,
                 overrides: tuple[str, ...] = ()) -> list[float]:
    """One run of `stage` in a fresh run dir holding copies of the teachers and logits caches
    it reads (every member's, for an ensemble of `kd.ensemble` after `overrides`)."""
    run_dir = work / f"{stage}-{teacher_mode}-{time.monotonic_ns()}"
    c = apply_overrides(from_dict(cfg.to_dict()), [f"run.dir={run_dir}", f"kd.teacher={teacher_mode}", *overrides])
    for member in range(1, ensemble.size(c) + 1):
        for sub in (stages.teacher_member(member).name, stages.cache_name(member)):
            shutil.copytree(cfg.run_dir / sub, run_dir / sub)
    train_stage(c, env, data, stage)
    times = _epoch_times(run_dir, stage)
    shutil.rmtree(run_dir)
    return times


def run(preset: str, overrides: list[str], work: Path, repeats: int = 2, epochs: int = 3) -> dict[str, Any]:
    cfg = load_config(preset, [f"run.dir={work / 'base'}", f"optim.student_epochs={epochs}",
                               "optim.teacher_epochs=1", "tracking.wandb.mode=disabled",
                               "tracking.progress=false", *overrides])
    env = setup(cfg)
    data = prepare_data(cfg, env)
    train_stage(cfg, env, data, stages.TEACHER.name)
    t0 = time.perf_counter()
    manifest = cache_logits(cfg, env, data)
    build_s = time.perf_counter() - t0
    samples: dict[str, list[float]] = {"normal": [], "kd_cached": [], "kd_live": []}
    for _ in range(repeats):  # interleaved, so drift in machine load hits all three alike
        samples["normal"] += _student_run(cfg, env, data, stages.STUDENT_NORMAL.name, "cached", work)
        samples["kd_cached"] += _student_run(cfg, env, data, stages.STUDENT_KD.name, "cached", work)
        samples["kd_live"] += _student_run(cfg, env, data, stages.STUDENT_KD.name, "live", work)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "preset": preset, "overrides": overrides,
        "teacher": cfg.model.teacher, "teacher_width": cfg.model.teacher_width,
        "views": cfg.kd.views, "train_images": data.size("train"),
        "epoch_s": med, "samples": samples,
        "cached_over_normal": med["kd_cached"] / med["normal"],
        "live_over_cached": med["kd_live"] / med["kd_cached"],
        "cache_build_s": round(build_s, 2), "cache_bytes": manifest["size_bytes"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| preset: teacher | views | normal epoch (s) | cached-KD epoch (s) | live-KD epoch (s) | cached/normal "
           "(target <= 1.15) | live/cached (target >= 8) | cache build (s) | cache size |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["epoch_s"]
        out.append(f"| {r['preset']}: {r['teacher']} w{r['teacher_width']} | {r['views']} | {e['normal']:.1f} | "
                   f"{e['kd_cached']:.1f} | {e['kd_live']:.1f} | {r['cached_over_normal']:.2f}x | "
                   f"{r['live_over_cached']:.2f}x | {r['cache_build_s']:.1f} | {r['cache_bytes'] / 1e6:.1f} MB |")
    return "\n".join(out)
