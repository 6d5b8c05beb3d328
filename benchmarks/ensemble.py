"""Ensemble distillation (`kd.ensemble=N`): what N teachers cost, cached and live.

    python -m benchmarks.ensemble [--json OUT] [--train-images 6144] [--repeats 2] [--threads 1]

The quick preset's models (teacher `teacher_cnn_lite` w32, student `student_cnn`) on
synthetic data. Five teachers are trained for one epoch each (their accuracy does not change
their cost; the members differ by seed), then every member's logits cache is built
(`cli.cache_member`, the loop body of `cli.cache_logits`, timed member by member: the cache of
an ensemble of N is members 1..N's, built one after another). Then, interleaved within each
repeat so drift in the machine's load hits all alike, the real training loop
(`train.train_stage`, via benchmarks.kd_epoch's run helper) runs the normal student, the KD
student of one teacher (cached and live) and, for N = 3 and 5, the ensemble's KD student
(cached and live). Each epoch figure is the median `epoch_time_s` of epochs after the first.

The cached ensemble's members are combined once, when the stage loads them
(`ensemble.cached_ensemble_table`), before the first epoch's clock starts: that time, and the
whole teacher set-up (checkpoints loaded, caches read and checksummed, combined), are timed
around the calls and reported apart; they are not in the epoch time. So is the ensemble's own
evaluation after training (`ensemble_facts`: every member's forward on the test split).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.kd_epoch import _student_run
from kd_ddp import ensemble, stages, train
from kd_ddp.cli import cache_member
from kd_ddp.config import Config, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv, setup
from kd_ddp.precision import amp_dtype, precision_name
from kd_ddp.teacher_logits import cache_dir
from kd_ddp.train import train_stage

SIZES = (1, 3, 5)
PRESET = "quick"  # its models and optimiser; the record names it
# The calls around a student stage's epochs that are timed apart (module, attribute, key):
# patched where the caller looks them up.
TIMED = ((train, "teacher_logits_source", "teacher_setup_s"), (train, "ensemble_source", "teacher_setup_s"),
         (ensemble, "cached_ensemble_table", "combine_s"), (train, "ensemble_facts", "ensemble_eval_s"))


def base_config(work: Path, train_images: int, test_images: int, epochs: int, n: int,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(PRESET, [
        f"run.dir={work / 'base'}", f"data.cache_dir={work / 'data'}", "data.source=synthetic", "data.root=",
        f"data.synthetic_train={train_images}", f"data.synthetic_test={test_images}",
        f"optim.student_epochs={epochs}", "optim.teacher_epochs=1", f"kd.ensemble={n}",
        "tracking.wandb.mode=disabled", "tracking.progress=false", *overrides])


@contextlib.contextmanager
def timed_calls(into: dict[str, float]) -> Iterator[None]:
    """Add the wall time of each TIMED call made inside to `into[key]`."""
    def wrap(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[key] = into.get(key, 0.0) + time.perf_counter() - t0
        return timed

    with contextlib.ExitStack() as stack:
        for module, name, key in TIMED:
            stack.enter_context(mock.patch.object(module, name, wrap(getattr(module, name), key)))
        yield


def train_members(cfg: Config, env: DistEnv, data: Any) -> list[float]:
    """Every member trained (1 epoch), as `kd-ddp train-teacher` does; the seconds each took."""
    took = []
    for stage in stages.teachers(ensemble.size(cfg)):
        t0 = time.perf_counter()
        train_stage(ensemble.member_config(cfg, stage.member), env, data, stage.name)
        took.append(time.perf_counter() - t0)
    return took


def build_member_caches(cfg: Config, env: DistEnv, data: Any) -> list[dict[str, Any]]:
    """Each member's logits cache built as `cli.cache_logits` builds it (teacher loaded, then
    every view's logits computed and written): its build time and its logits.npy's bytes."""
    rows = []
    for stage in stages.teachers(ensemble.size(cfg)):
        t0 = time.perf_counter()
        manifest = cache_member(cfg, env, data, stage.member, rebuild_invalid=True)
        took = time.perf_counter() - t0
        on_disk = (cache_dir(cfg, stage.member) / "logits.npy").stat().st_size
        assert on_disk == manifest["size_bytes"], (on_disk, manifest)
        rows.append({"member": stage.member, "build_s": took, "bytes": on_disk,
                     "manifest_build_s": manifest["build_time_s"]})
    return rows


def _runs(sizes: tuple[int, ...]) -> list[tuple[str, int, str, str]]:
    """(kind, N, stage, teacher mode) of one repeat, in order."""
    out = [("normal", 1, stages.STUDENT_NORMAL.name, "cached")]
    for n in sizes:
        stage = stages.STUDENT_KD.name if n == 1 else stages.STUDENT_KD_ENSEMBLE.name
        out += [("cached", n, stage, "cached"), ("live", n, stage, "live")]
    return out


def run(work: Path, train_images: int = 6144, test_images: int = 1024, repeats: int = 2, epochs: int = 3,
        sizes: tuple[int, ...] = SIZES, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole benchmark in `work` (left there: the caller removes it); `overrides` change
    the base config (the test's smaller models)."""
    cfg = base_config(work, train_images, test_images, epochs, max(sizes), overrides)
    env = setup(cfg)
    data = prepare_data(cfg, env)
    teacher_s = train_members(cfg, env, data)
    members = build_member_caches(cfg, env, data)
    samples: dict[str, list[float]] = {}
    setup_s: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits every run alike
        for kind, n, stage, mode in _runs(sizes):
            key = kind if kind == "normal" else f"{kind}_{n}"
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            with timed_calls(timings):
                times = _student_run(cfg, env, data, stage, mode, work, (f"kd.ensemble={n if n > 1 else 0}",))
            timings["stage_s"] = time.perf_counter() - t0
            samples.setdefault(key, []).extend(times)
            setup_s.setdefault(key, []).append(timings)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for n in sizes:
        mine = members[:n]
        cached, live = med[f"cached_{n}"], med[f"live_{n}"]

        def setup_median(kind: str, field: str, n: int = n) -> float:
            return statistics.median(t.get(field, 0.0) for t in setup_s[f"{kind}_{n}"])

        rows.append({
            "n": n, "student_stage": stages.STUDENT_KD.name if n == 1 else stages.STUDENT_KD_ENSEMBLE.name,
            "cache_build_s": sum(m["build_s"] for m in mine), "cache_bytes": sum(m["bytes"] for m in mine),
            "epoch_cached_s": cached, "epoch_live_s": live,
            "cached_over_normal": cached / med["normal"], "live_over_normal": live / med["normal"],
            "live_over_cached": live / cached,
            "cached_setup_s": setup_median("cached", "teacher_setup_s"),
            "cached_combine_s": setup_median("cached", "combine_s"),
            "live_setup_s": setup_median("live", "teacher_setup_s"),
            "ensemble_eval_s": setup_median("cached", "ensemble_eval_s"),
        })
    return {
        "preset": PRESET, "device": str(env.device), "amp": precision_name(amp_dtype(cfg, env.device)),
        "teacher": cfg.model.teacher, "teacher_width": cfg.model.teacher_width,
        "student": cfg.model.student, "student_width": cfg.model.student_width,
        "train_images": data.size("train"), "test_images": data.size("test"), "batch": cfg.optim.batch_size,
        "views": cfg.kd.views, "cache_dtype": cfg.kd.cache_dtype, "epochs": epochs, "repeats": repeats,
        "teacher_train_s": teacher_s, "members": members,
        "threads": torch.get_num_threads(),
        "epoch_normal_s": med["normal"], "epoch_s": med, "samples": samples, "setup": setup_s, "rows": rows,
    }


def markdown(r: dict[str, Any]) -> str:
    out = [f"{r['train_images']:,} synthetic 32px images, batch {r['batch']}, teacher `{r['teacher']}` "
           f"w{r['teacher_width']}, student `{r['student']}` w{r['student_width']}, {r['views']} views "
           f"({r['cache_dtype']}), {r['threads']} torch thread(s); medians of epochs 2-{r['epochs']} of "
           f"{r['repeats']} interleaved repeats. Normal student epoch: {r['epoch_normal_s']:.2f} s.", "",
           "| N | cache build (s) | cache on disk | cached-KD epoch (s) | live-KD epoch (s) | cached / normal "
           "(target <= 1.15) | live / normal | live / cached | teacher set-up, cached (s) | of it: caches read + "
           "combined (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['n']} | {row['cache_build_s']:.1f} | {row['cache_bytes'] / 1e6:.2f} MB | "
                   f"{row['epoch_cached_s']:.2f} | {row['epoch_live_s']:.2f} | {row['cached_over_normal']:.2f}x | "
                   f"{row['live_over_normal']:.2f}x | {row['live_over_cached']:.2f}x | {row['cached_setup_s']:.2f} | "
                   f"{row['cached_combine_s']:.3f} |")
    out += ["", "N = 1 is `student-kd` (one teacher); N >= 2 `student-kd-ensemble`. The teacher set-up (checkpoints "
            "loaded, caches read and checksummed, combined once) runs before the first epoch's clock starts: "
            "it is not in the epoch time."]
    return "\n".join(out)


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m benchmarks.ensemble")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--train-images", type=int, default=6144)
    p.add_argument("--test-images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (train.threads and data.num_workers: FFCV's loader sets torch's thread "
                        "count to its worker count every epoch; 0: the machine's cores). On a machine shared with "
                        "other work, 1 keeps OpenMP threads from spin-waiting on each other (see BENCHMARKS.md)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-bench-ensemble-") as tmp:
        t0 = time.perf_counter()
        result = run(Path(tmp), args.train_images, args.test_images, args.repeats, args.epochs,
                     overrides=[f"train.threads={args.threads}", f"data.num_workers={args.threads}"])
        result["total_s"] = time.perf_counter() - t0
    print(markdown(result))
    print(f"\n(whole benchmark: {result['total_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
