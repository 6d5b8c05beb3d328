"""Teacher training step: memory format x precision, and the distance to the compute limit.

Step: the teacher's forward + CE + backward + SGD step on one in-memory batch, for
fp32 NCHW (the plain way), fp32 channels_last, and channels_last + bf16 autocast; on a CPU
also torch.compile, on a GPU fp16 autocast instead (compiling there costs more device time
than the whole check has).
Compute limit: a real training epoch (loader, augmentation, logging: `train_stage`) vs the
same number of optimizer steps on a batch already in memory.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kd_ddp.config import Config, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv, pick_device
from kd_ddp.models import build_model
from kd_ddp.train import amp_dtype, train_stage

# name -> (channels_last, autocast dtype, torch.compile)
Variant = tuple[bool, torch.dtype | None, bool]
CPU = torch.device("cpu")
_COMMON_VARIANTS: dict[str, Variant] = {
    "fp32 NCHW": (False, None, False), "fp32 channels_last": (True, None, False),
    "bf16 autocast + channels_last": (True, torch.bfloat16, False)}
CPU_VARIANTS = {**_COMMON_VARIANTS, "fp32 channels_last + torch.compile": (True, None, True)}
GPU_VARIANTS = {**_COMMON_VARIANTS, "fp16 autocast + channels_last": (True, torch.float16, False)}


def variants(device: torch.device) -> dict[str, Variant]:
    return GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS


def teacher_step(cfg: Config, channels_last: bool, dtype: torch.dtype | None, batch: int,
                 compile: bool = False, device: torch.device = CPU) -> Callable[[], None]:
    """One teacher training step (forward, CE, backward, SGD) on a fixed in-memory batch."""
    torch.manual_seed(0)
    model = build_model(cfg, "teacher", 10).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: stop the clock when they are done
        torch.cuda.synchronize(device)


def _step_time(cfg: Config, channels_last: bool, dtype: torch.dtype | None, steps: int, batch: int,
               compile: bool = False, device: torch.device = CPU) -> float:
    step = teacher_step(cfg, channels_last, dtype, batch, compile, device)
    for _ in range(3):  # warm-up: allocator, oneDNN/cuDNN algorithm choice, and the compile itself
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def run_steps(models: list[list[str]], steps: int = 8, batch: int = 256, repeats: int = 3,
              device: torch.device | None = None) -> list[dict[str, Any]]:
    device = device or pick_device("auto", 0)
    rows = []
    for overrides in models:
        cfg = load_config("quick", overrides)
        samples: dict[str, list[float]] = {k: [] for k in variants(device)}
        for _ in range(repeats):  # interleaved
            for name, (cl, dtype, comp) in variants(device).items():
                samples[name].append(batch / _step_time(cfg, cl, dtype, steps, batch, comp, device))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append({"model": f"{cfg.model.teacher} w{cfg.model.teacher_width}", "images_per_s": med,
                     "samples": samples, "device": str(device)})
    return rows


def run_compute_limit(archive: str, cache_dir: Path, work: Path, epochs: int = 2) -> dict[str, Any]:
    cfg = load_config("quick", [f"data.root={archive}", f"data.cache_dir={cache_dir}", f"run.dir={work}",
                                f"optim.teacher_epochs={epochs}", "tracking.wandb.mode=disabled",
                                "tracking.progress=false"])
    env = DistEnv(device=pick_device("auto", 0))
    data = prepare_data(cfg, env)
    train_stage(cfg, env, data, "teacher")
    rows = [json.loads(x) for x in (work / "teacher" / "metrics.jsonl").read_text().splitlines()]
    epoch_s = statistics.median(r["epoch_time_s"] for r in rows[1:])  # after FFCV's JIT epoch
    steps = data.size("train") // cfg.optim.batch_size
    # the precision the real epoch ran in (train.amp=auto: bf16 on a GPU, fp32 on this CPU)
    limit_s = steps * _step_time(cfg, cfg.train.channels_last, amp_dtype(cfg, env.device), 20,
                                 cfg.optim.batch_size, device=env.device)
    return {"epoch_s": epoch_s, "limit_s": limit_s, "overhead": epoch_s / limit_s - 1, "steps": steps}


def markdown(rows: list[dict[str, Any]], limit: dict[str, Any] | None) -> str:
    names = list(rows[0]["images_per_s"]) if rows else list(CPU_VARIANTS)
    out = ["| model | " + " | ".join(names) + " | best vs fp32 NCHW (target >= 3x) |",
           "|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        m = r["images_per_s"]
        base = m["fp32 NCHW"]
        out.append(f"| {r['model']} | " + " | ".join(f"{m[k]:.0f} img/s ({m[k] / base:.2f}x)" for k in names)
                   + f" | {max(m.values()) / base:.2f}x |")
    if limit:
        out += ["", "| real teacher epoch (s) | same steps on an in-memory batch (s) | overhead (target <= 10%) |",
                "|---|---|---|",
                f"| {limit['epoch_s']:.1f} | {limit['limit_s']:.1f} | {100 * limit['overhead']:+.1f}% |"]
    return "\n".join(out)
