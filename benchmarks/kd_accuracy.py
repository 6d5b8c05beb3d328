"""KD student accuracy with cached teacher logits vs the live teacher (the seed's way), quick preset.

The cache must not change the method, only its cost. Cached KD trains epoch e on view
e % kd.views with the stored logits of exactly those pixels; the live teacher runs on a fresh
view every epoch. At the quick preset (4 student epochs, 4 views) both see the same views,
so this checks that fp16 logits read from disk train as well as the live fp32 forward; the
seed preset's live-teacher variant in results/ (20 epochs over 8 views) adds the cost of
reusing views. One quick-preset teacher (seed 0) serves every student; each seed trains one
KD student per mode (init and augmentation from that seed, the cache built for that seed's
views). About 25 minutes on the 2-core dev CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_ddp import stages
from kd_ddp.cli import cache_logits
from kd_ddp.config import apply_overrides, from_dict, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import setup
from kd_ddp.report import mean_std
from kd_ddp.train import train_stage
from launch.plan import link

MODES = ("cached", "live")


def run(data_overrides: list[str], work: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    base = load_config("quick", [f"run.dir={work / 'teacher-run'}", "tracking.wandb.mode=disabled",
                                 "tracking.progress=false", *data_overrides])
    env = setup(base)
    data = prepare_data(base, env)
    teacher = train_stage(base, env, data, stages.TEACHER.name)
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for mode in MODES:
            run_dir = work / f"seed{seed}-{mode}"
            link(run_dir / stages.TEACHER.name, base.run_dir / stages.TEACHER.name)
            cfg = apply_overrides(from_dict(base.to_dict()), [f"run.dir={run_dir}", f"seed={seed}",
                                                              f"kd.teacher={mode}"])
            if mode == "cached":
                cache_logits(cfg, env, data)
            summary = train_stage(cfg, env, data, stages.STUDENT_KD.name)
            row[mode] = summary["test_acc"]
            row[f"{mode}_train_time_s"] = summary["train_time_s"]
        rows.append(row)
    return {
        "preset": "quick", "teacher_test_acc": teacher["test_acc"], "views": base.kd.views,
        "student_epochs": base.epochs_for(stages.STUDENT_ROLE), "rows": rows,
        **{m: mean_std([r[m] for r in rows]) for m in MODES},
        "cached_minus_live": mean_std([r["cached"] - r["live"] for r in rows]),
    }


def markdown(r: dict[str, Any]) -> str:
    out = ["| seed | KD, cached logits | KD, live teacher | cached - live | train time cached / live (s) |",
           "|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['seed']} | {row['cached']:.4f} | {row['live']:.4f} | {row['cached'] - row['live']:+.4f} | "
                   f"{row['cached_train_time_s']:.0f} / {row['live_train_time_s']:.0f} |")
    c, v, d = r["cached"], r["live"], r["cached_minus_live"]
    out.append(f"| mean +- std | {c['mean']:.4f} +- {c['std']:.4f} | {v['mean']:.4f} +- {v['std']:.4f} | "
               f"{d['mean']:+.4f} +- {d['std']:.4f} | |")
    out += ["", f"Quick preset: teacher test accuracy {r['teacher_test_acc']:.4f}, {r['views']} cached views, "
            f"{r['student_epochs']} student epochs."]
    return "\n".join(out)
