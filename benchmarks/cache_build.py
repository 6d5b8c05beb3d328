"""The teacher-logits cache build against its compute limit, the teacher's forward pass.

Side by side in one process, on the quick preset's teacher (teacher_cnn_lite w32, random
weights: they do not change the cost) and synthetic data of CIFAR-10's image size, at the
precision `train.amp=auto` picks on this device:
- build: `kd_ddp.teacher_logits.build_cache`, what `kd-ddp cache-logits` runs (loader,
  crop + flip, normalize, forward, the rows written to the .npy), per loader; images/s
  over all views (views x training images / build time).
- forward: the teacher's forward pass alone (eval, no_grad, the run's autocast) on one
  normalized batch held in memory, at the build's batch (`train.eval_batch_size`): the
  rate the build would reach if everything but the forward cost nothing.
- train step: `Trainer.train_step` of the teacher at the preset's training batch, for
  context (a forward is about a third of a training step).

`python -m benchmarks.cache_build [--train-images N] [--views V] [--loaders device ffcv]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_step import step_fn, sync, time_steps
from kd_ddp.augment import StudentInput
from kd_ddp.config import Config, load_config
from kd_ddp.data import EvalLoader, PreparedData, ffcv_available, prepare_data
from kd_ddp.distributed import DistEnv, available_cores, pick_device
from kd_ddp.models import make_model
from kd_ddp.precision import amp_dtype, autocast, precision_name
from kd_ddp.teacher_logits import TeacherRecord, build_cache

FORWARD_BATCHES = 8  # timed forward passes per repeat (after 2 warm-up ones)
TRAIN_STEPS = 5  # timed training steps per repeat (after time_steps' warm-up)


def _config(work: Path, loader: str, train_images: int, views: int) -> Config:
    return load_config("quick", [
        "data.source=synthetic", "data.root=", f"data.synthetic_train={train_images}", "data.synthetic_test=64",
        f"data.cache_dir={work / 'data'}", f"run.dir={work / f'run-{loader}'}", f"data.loader={loader}",
        f"kd.views={views}", "tracking.wandb.mode=disabled", "tracking.progress=false"])


def _build_fn(cfg: Config, env: DistEnv, data: PreparedData) -> Callable[[], None]:
    """One whole cache build with the quick teacher (every view, rows written and checksummed)."""
    teacher = make_model(cfg, "teacher", data.num_classes, env.device)
    dtype = amp_dtype(cfg, env.device)
    record = TeacherRecord("benchmark", {"teacher": cfg.model.teacher}, precision_name(dtype))

    def build() -> None:
        build_cache(cfg, env, data, teacher, record, dtype)

    return build


def _forward_fn(cfg: Config, env: DistEnv, data: PreparedData) -> Callable[[], None]:
    """The teacher's forward pass alone on the build's first batch, already normalized in memory."""
    teacher = make_model(cfg, "teacher", data.num_classes, env.device).eval()
    dtype = amp_dtype(cfg, env.device)
    images, _, idx = (t.clone() for t in next(iter(EvalLoader(cfg, data, env, split="train"))))
    x = StudentInput.of(cfg, *data.stats(env.device))(images, idx, 0)

    @torch.no_grad()
    def forward() -> None:
        with autocast(env.device, dtype):
            teacher(x).float()

    return forward


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run(work: Path, loaders: list[str], train_images: int = 10_000, views: int = 2, repeats: int = 2,
        threads: int = 0) -> dict[str, Any]:
    """`threads`: torch's threads in every timed round (0: as now). Importing FFCV sets them
    to 1 (see data._import_ffcv): main() passes the count torch had before any import of it."""
    threads = threads or torch.get_num_threads()
    device = pick_device("auto", 0)
    env = DistEnv(device=device, cpus=available_cores())
    cfgs = {name: _config(work, name, train_images, views) for name in loaders}
    base = cfgs[loaders[0]]
    data = prepare_data(base, env)
    builds = {name: _build_fn(cfg, env, data) for name, cfg in cfgs.items()}
    forward = _forward_fn(base, env, data)
    step_cfg = _config(work, "device", train_images, views)  # the training step: device-resident data
    train_step = step_fn(step_cfg, env, data)
    for build in builds.values():  # warm-up: FFCV's JIT, the .beton, the allocator
        build()
    images = views * train_images
    batch, train_batch = base.train.eval_batch_size, base.optim.batch_size
    samples: dict[str, list[float]] = {f"build {n}": [] for n in loaders} | {"forward": [], "train step": []}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits all alike
        for name, build in builds.items():
            torch.set_num_threads(threads)  # a build through FFCV may have changed them
            samples[f"build {name}"].append(images / _timed(build, device))
        torch.set_num_threads(threads)
        samples["forward"].append(batch / time_steps(forward, FORWARD_BATCHES, device, warmup=2))
        samples["train step"].append(train_batch / time_steps(train_step, TRAIN_STEPS, device))
    return {"device": str(device), "threads": threads,
            "precision": precision_name(amp_dtype(base, device)),
            "teacher": f"{base.model.teacher} w{base.model.teacher_width}", "train_images": train_images,
            "views": views, "batch": batch, "train_batch": train_batch,
            "images_per_s": {k: statistics.median(v) for k, v in samples.items()},
            "best": {k: max(v) for k, v in samples.items()}, "samples": samples}


def markdown(r: dict[str, Any]) -> str:
    rates = r["images_per_s"]
    fwd = rates["forward"]
    out = [f"{r['teacher']}, {r['precision']}, {r['views']} views x {r['train_images']} images, build batch "
           f"{r['batch']}, training batch {r['train_batch']}, device {r['device']}, {r['threads']} torch threads", "",
           "| what | images/s (median) | vs forward only | vs training step | best round (images/s) |",
           "|---|---|---|---|---|"]
    for name, rate in rates.items():
        out.append(f"| {name} | {rate:.0f} | {rate / fwd:.2f} | {rate / rates['train step']:.2f} | "
                   f"{r['best'][name]:.0f} |")
    return "\n".join(out)


def main() -> None:
    threads = torch.get_num_threads()  # before ffcv_available() imports FFCV, which sets them to 1
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_build")
    p.add_argument("--train-images", type=int, default=10_000, help="synthetic training images (32x32)")
    p.add_argument("--views", type=int, default=2, help="kd.views: views the cache holds")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds, after one warm-up build per loader")
    p.add_argument("--loaders", nargs="+", default=["device", *(["ffcv"] if ffcv_available() else [])],
                   choices=["device", "torch", "ffcv"], help="data.loader of the builds timed")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-cache-bench-") as tmp:
        r = run(Path(tmp), a.loaders, a.train_images, a.views, a.repeats, threads)
    print(markdown(r))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
