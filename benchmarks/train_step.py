"""Training step: memory format x precision, and each stage's distance to its compute limit.

Every figure times `kd_ddp.train.Trainer.train_step`, the step the training loop runs
(augment, normalize, forward, loss, backward, the masked fused-SGD update, the device-side
tally), never a copy of it:
- step: the teacher's step on one in-memory batch for fp32 NCHW (the plain way), fp32
  channels_last and channels_last + bf16 autocast; on a CPU also torch.compile, on a GPU
  fp16 autocast instead (compiling there costs more device time than the check has).
- tensor step (`run_tensor_step`): today's step, whose LR, view and seed are device tensors
  (eager, and on a GPU replayed as a CUDA graph: train.cuda_graph), against the step as it
  was before (`legacy_step`: a Python-number LR stepped by LambdaLR, an int view).
- compute limit, per stage (teacher, normal student, cached-KD student): a real training
  epoch (loader, augmentation, flag checks, logging: `train_stage`) against the same number
  of `train_step` calls on one batch already in memory, at the batch the stage uses.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_ddp import stages
from kd_ddp.cli import cache_logits
from kd_ddp.config import Config, load_config
from kd_ddp.data import PreparedData, prepare_data
from kd_ddp.distributed import DistEnv, pick_device
from kd_ddp.metrics_io import read_metrics
from kd_ddp.models import make_model
from kd_ddp.objectives import TeacherLogits, teacher_logits_source
from kd_ddp.precision import autocast
from kd_ddp.train import Trainer, train_stage

CPU = torch.device("cpu")
# name -> overrides of the variant
_COMMON_VARIANTS: dict[str, list[str]] = {
    "fp32 NCHW": ["train.channels_last=false", "train.amp=off"],
    "fp32 channels_last": ["train.channels_last=true", "train.amp=off"],
    "bf16 autocast + channels_last": ["train.channels_last=true", "train.amp=bf16"]}
CPU_VARIANTS = {**_COMMON_VARIANTS, "fp32 channels_last + torch.compile": [
    "train.channels_last=true", "train.amp=off", "train.compile=true"]}
GPU_VARIANTS = {**_COMMON_VARIANTS, "fp16 autocast + channels_last": ["train.channels_last=true", "train.amp=fp16"]}


def variants(device: torch.device) -> dict[str, list[str]]:
    return GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: stop the clock when they are done
        torch.cuda.synchronize(device)


def step_fn(cfg: Config, env: DistEnv, data: PreparedData, stage: str = stages.TEACHER.name,
            teacher: TeacherLogits | None = None) -> Callable[[], None]:
    """`Trainer.train_step` of `stage` on one batch of its own loader, held in memory."""
    trainer = Trainer(cfg, env, data, stage, teacher)
    images, labels, idx = (t.clone() for t in next(iter(trainer.loader.epoch(0))))  # FFCV reuses its buffers
    trainer.net.train()
    return lambda: trainer.train_step(images, labels, idx, 0)


def use_float_lr(trainer: Trainer) -> None:
    """Python-number LRs in the optimizer again, stepped by the trainer's LambdaLR (`legacy_step`)."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = float(group["lr"])


def legacy_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, view: int) -> None:
    """`Trainer.train_step` as it was before the LR, view and seed became device tensors
    (f0f08b2, one rank, no GradScaler): the int view keys the augmentation, the LR is a
    Python float the LambdaLR sets after each step. On the trainer's own parts, after
    `use_float_lr`; the reference tests/test_tensor_step.py compares the step with."""
    x = trainer.student_input(images, idx, view)
    with autocast(trainer.env.device, trainer.dtype):
        logits = trainer.net(x)
    loss = trainer.objective(logits, x, labels, idx, view)
    bad = ~torch.isfinite(loss.detach())
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.found_inf = bad.float()
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.tally.add(loss.detach(), bad, len(labels), trainer.limit)


def step_forms(device: torch.device) -> dict[str, list[str]]:
    """The step forms `run_tensor_step` times: name -> train.cuda_graph (None: legacy_step)."""
    forms: dict[str, list[str]] = {"Python LR + int view (before)": [], "tensor-only, eager": ["train.cuda_graph=off"]}
    if device.type == "cuda":
        forms["tensor-only, CUDA graph"] = ["train.cuda_graph=on"]
    return forms


def legacy_fn(cfg: Config, env: DistEnv, data: PreparedData) -> Callable[[], None]:
    """`legacy_step` on one batch of the teacher's loader, held in memory."""
    trainer = Trainer(cfg, env, data, stages.TEACHER.name)
    images, labels, idx = (t.clone() for t in next(iter(trainer.loader.epoch(0))))
    trainer.net.train()
    use_float_lr(trainer)
    return lambda: legacy_step(trainer, images, labels, idx, 0)


def run_tensor_step(cache_dir: Path, work: Path, batch: int = 256, steps: int = 8, repeats: int = 3,
                    device: torch.device | None = None) -> dict[str, Any]:
    """The teacher's step (fp32 channels_last on a CPU, bf16 on a GPU) in each form of
    `step_forms`, interleaved; img/s medians. The warm-up covers the graph's capture."""
    device = device or pick_device("auto", 0)
    amp = "train.amp=bf16" if device.type == "cuda" else "train.amp=off"
    samples: dict[str, list[float]] = {k: [] for k in step_forms(device)}
    for _ in range(repeats):
        for name, extra in step_forms(device).items():
            cfg, env, data = synthetic(cache_dir, work, batch, ["train.channels_last=true", amp, *extra], device)
            fn = step_fn(cfg, env, data) if extra else legacy_fn(cfg, env, data)
            samples[name].append(batch / time_steps(fn, steps, device, warmup=5))
    return {"batch": batch, "device": str(device), "amp": amp.split("=")[1], "samples": samples,
            "images_per_s": {k: statistics.median(v) for k, v in samples.items()}}


def tensor_step_markdown(r: dict[str, Any]) -> str:
    m = r["images_per_s"]
    base = m["Python LR + int view (before)"]
    return "\n".join(["| step form | img/s | vs before |", "|---|---|---|",
                      *(f"| {k} | {v:.0f} | {v / base:.3f}x |" for k, v in m.items())])


def time_steps(step: Callable[[], None], steps: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per step, after warm-up (allocator, oneDNN/cuDNN algorithm choice, compile)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def synthetic(cache_dir: Path, work: Path, batch: int, overrides: list[str],
              device: torch.device) -> tuple[Config, DistEnv, PreparedData]:
    """A config on synthetic 32x32 data held on the device: a step's cost without a disk."""
    cfg = load_config("quick", [
        "data.source=synthetic", "data.root=", f"data.synthetic_train={batch}", "data.synthetic_test=64",
        f"data.cache_dir={cache_dir}", f"run.dir={work}", f"optim.batch_size={batch}", "data.loader=device",
        "tracking.wandb.mode=disabled", *overrides])
    env = DistEnv(device=device)
    return cfg, env, prepare_data(cfg, env)


def run_steps(models: list[list[str]], cache_dir: Path, work: Path, steps: int = 8, batch: int = 256,
              repeats: int = 3, device: torch.device | None = None) -> list[dict[str, Any]]:
    device = device or pick_device("auto", 0)
    rows = []
    for overrides in models:
        samples: dict[str, list[float]] = {k: [] for k in variants(device)}
        for _ in range(repeats):  # interleaved
            for name, extra in variants(device).items():
                cfg, env, data = synthetic(cache_dir, work, batch, [*overrides, *extra], device)
                samples[name].append(batch / time_steps(step_fn(cfg, env, data), steps, device))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append({"model": f"{cfg.model.teacher} w{cfg.model.teacher_width}", "images_per_s": med,
                     "samples": samples, "device": str(device)})
    return rows


def _epoch_s(run_dir: Path, stage: str) -> float:
    rows = read_metrics(run_dir / stage / "metrics.jsonl")
    return statistics.median(r["epoch_time_s"] for r in rows[1:])  # after the first (FFCV's JIT, cuDNN choice)


def run_compute_limit(archive: str, cache_dir: Path, work: Path, epochs: int = 3, preset: str = "quick",
                      overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Per stage: a real epoch vs the same number of train_step calls on one in-memory batch."""
    cfg = load_config(preset, [f"data.root={archive}", f"data.cache_dir={cache_dir}", f"run.dir={work}",
                               f"optim.epochs={epochs}", "kd.views=2", "tracking.wandb.mode=disabled",
                               "tracking.progress=false", *(overrides or [])])
    env = DistEnv(device=pick_device(cfg.train.device, 0))
    data = prepare_data(cfg, env)
    rows = []
    for stage in (s.name for s in stages.TRAINED):
        kd = stage == stages.STUDENT_KD.name
        if kd:
            cache_logits(cfg, env, data)
        train_stage(cfg, env, data, stage)
        epoch_s = _epoch_s(work, stage)
        teacher = teacher_logits_source(cfg, data, env, None)[0] if kd else None
        step = step_fn(cfg, env, data, stage, teacher)
        steps = data.size("train") // cfg.optim.batch_size
        limit_s = steps * time_steps(step, min(steps, 30), env.device)
        rows.append({"stage": stage, "epoch_s": epoch_s, "limit_s": limit_s, "overhead": epoch_s / limit_s - 1,
                     "steps": steps, "batch": cfg.optim.batch_size, "images_per_s": steps * cfg.optim.batch_size
                     / epoch_s, "device": str(env.device), "loader": json.loads(
                         (work / stage / "summary.json").read_text())["loader"]})
    return rows


def markdown(rows: list[dict[str, Any]], limit: list[dict[str, Any]] | None) -> str:
    out: list[str] = []
    if rows:
        names = list(rows[0]["images_per_s"])
        out += ["| model | " + " | ".join(names) + " | best vs fp32 NCHW (target >= 3x) |",
                "|---|" + "---|" * (len(names) + 1)]
        for r in rows:
            m = r["images_per_s"]
            base = m["fp32 NCHW"]
            out.append(f"| {r['model']} | " + " | ".join(f"{m[k]:.0f} img/s ({m[k] / base:.2f}x)" for k in names)
                       + f" | {max(m.values()) / base:.2f}x |")
    if limit:
        out += ["", "| stage | batch | loader | real epoch (s) | same steps on an in-memory batch (s) | real epoch "
                "img/s | real / in-memory |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['stage']} | {r['batch']} | {r['loader']} | {r['epoch_s']:.2f} | {r['limit_s']:.2f} | "
                f"{r['images_per_s']:.0f} | {1 + r['overhead']:.3f} |" for r in limit]
    return "\n".join(out)


def kd_teacher_logits(cfg: Config, env: DistEnv, data: PreparedData, live: bool) -> TeacherLogits:
    """A KD student's teacher logits for the step benchmarks: from a random table on the device
    (as the cache gives them: one gather) or from a live forward of an untrained teacher (its
    cost is a trained one's)."""
    if live:
        teacher = make_model(cfg, stages.TEACHER_ROLE, data.num_classes, env.device).eval()

        @torch.no_grad()
        def forward(x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
            return teacher(x).float()

        return forward
    table = torch.randn(data.size("train"), data.num_classes, device=env.device)
    return lambda x, idx, view: table[idx]
