"""Where a stage's memory goes: resident set size after each step of a process's life.

    python -m benchmarks.memory [--train-images 8192]

One fresh process imports torch and FFCV, prepares a synthetic data set, builds the FFCV
loader, reads one epoch and trains the smoke teacher; after each step it records the current
RSS and the peak so far. Run it in its own process: the peak is per process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

from kd_ddp.process_memory import rss_mb


def run(train_images: int = 8192) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def mark(what: str) -> None:
        cur, peak = rss_mb()
        rows.append({"step": what, "rss_mb": round(cur), "peak_mb": round(peak)})

    mark("python")
    import torch  # noqa: F401

    mark("import torch")
    from kd_ddp.data import ffcv_available

    if ffcv_available():
        import ffcv  # noqa: F401

        mark("import ffcv (numba, opencv)")
    from kd_ddp import stages
    from kd_ddp.config import load_config
    from kd_ddp.data import TrainLoader, prepare_data
    from kd_ddp.distributed import DistEnv
    from kd_ddp.train import train_stage

    with tempfile.TemporaryDirectory(prefix="kd-mem-") as d:
        cfg = load_config("smoke", [f"data.cache_dir={d}", f"data.synthetic_train={train_images}",
                                    f"run.dir={d}/run", "tracking.wandb.mode=disabled", "tracking.progress=false"])
        env = DistEnv()
        data = prepare_data(cfg, env)
        mark(f"prepare {train_images} images (.npy written)")
        loader = TrainLoader(cfg, data, env)
        mark("build the loader (FFCV: its .beton written)")
        for _ in loader.epoch(0):
            pass
        mark("one loader epoch")
        train_stage(cfg, env, data, stages.TEACHER.name)
        mark("train the smoke teacher (2 epochs + eval)")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| after | RSS (MB) | peak so far (MB) |", "|---|---|---|"]
    out += [f"| {r['step']} | {r['rss_mb']} | {r['peak_mb']} |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--json", action="store_true", help="print the rows as JSON (for benchmarks/__main__)")
    a = p.parse_args()
    result = run(a.train_images)
    print(json.dumps(result) if a.json else markdown(result))
