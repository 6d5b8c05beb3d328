"""The training loop, for all three runs: teacher (CE), student-normal (MSE), student-kd (KD).

Data flow of one step: the loader gives NHWC uint8 images with their sample indices ->
`augment` (crop + flip, a pure function of seed, view and index) -> `normalize` to a
channels_last float tensor -> model under autocast -> the stage's loss (for KD, with the
teacher's logits for the same view from the cache or from a live teacher forward).
Epoch e uses view e; the KD student uses view e % kd.views, the views the cache holds.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from kd_ddp import losses
from kd_ddp.augment import augment, normalize
from kd_ddp.checkpoint import CheckpointError, atomic_write_json, load_checkpoint, save_checkpoint, weights_hash
from kd_ddp.config import Config, describe_differences, fingerprint
from kd_ddp.data import EvalLoader, PreparedData, TrainLoader
from kd_ddp.distributed import DistEnv, all_reduce_sum, barrier
from kd_ddp.models import build_model
from kd_ddp.process_memory import rss_mb
from kd_ddp.teacher_logits import LogitsCache, teacher_view_logits
from kd_ddp.tracking import StageTracker, machine, start_stage

log = logging.getLogger(__name__)

STAGES = ("teacher", "student-normal", "student-kd")


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM) and checkpointed mid-epoch; rerunning resumes."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


class StopRequest:
    """SIGTERM (kill, torchrun shutting a group down, Slurm preemption) sets a flag; the loop
    checkpoints after the current step. The step loop sums the flag over ranks, so all stop
    at one step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def close(self) -> None:
        """Outside the step loop, SIGTERM must act as usual again."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


# -- precision ------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """bf16 autocast only pays on CPUs with bf16 instructions (AVX512-BF16 or AMX);
    elsewhere oneDNN emulates it and a step gets several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.train.amp
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


# -- model, optimizer, schedule -------------------------------------------------------


def make_model(cfg: Config, role: str, num_classes: int, env: DistEnv) -> nn.Module:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, role, num_classes).to(env.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine annealing to zero: a factor of the peak LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def stage_fingerprint(cfg: Config, stage: str, data: PreparedData, teacher_hash: str = "") -> dict[str, Any]:
    """Everything that changes a stage's result; a checkpoint made under another is refused."""
    role = "teacher" if stage == "teacher" else "student"
    m = cfg.model
    fp: dict[str, Any] = {
        "stage": stage,
        "data": data.content_hash,
        "augmentation": [cfg.data.crop_padding, cfg.data.flip],
        "model": [getattr(m, role), getattr(m, f"{role}_width"), getattr(m, f"{role}_hidden"), m.dropout],
        "optim": {k: v for k, v in vars(cfg.optim).items() if k not in ("teacher_epochs", "student_epochs")}
        | {"epochs": cfg.epochs_for(role), "lr": cfg.lr_for(role)},
        "seed": cfg.seed,
    }
    if stage == "student-normal":
        fp["mse_input"] = cfg.kd.mse_input
    if stage == "student-kd":
        fp["kd"] = [cfg.kd.alpha, cfg.kd.temperature, cfg.kd.views, teacher_hash]
    return fp


# -- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, env: DistEnv, mean: torch.Tensor, std: torch.Tensor,
             cfg: Config, dtype: torch.dtype | None) -> tuple[float, float]:
    """(mean CE loss, accuracy) over the whole split: each rank its shard, then summed."""
    model.eval()
    # summed on the device and read once: a read per batch would stall a GPU per batch
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss, correct
    count = 0
    for images, labels, _ in loader:
        x = normalize(images, mean, std, cfg.train.channels_last)
        with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        sums[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        count += len(labels)
    loss_sum, correct, total = all_reduce_sum([*sums.tolist(), float(count)], env)
    return loss_sum / total, correct / total


# -- one stage ------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _teacher_source(cfg: Config, data: PreparedData, env: DistEnv, dtype: torch.dtype | None
                    ) -> tuple[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], str]:
    """(view logits function, teacher weights hash) for the KD student."""
    teacher, teacher_hash = load_trained_teacher(cfg, data, env)
    if cfg.kd.teacher == "cached":
        cache = LogitsCache(cfg, data, teacher_hash, env.device)
        return (lambda images, idx, view: cache.lookup(view, idx)), teacher_hash
    mean, std = data.stats(env.device)
    return (lambda images, idx, view: teacher_view_logits(
        teacher, images, idx, cfg=cfg, view=view, mean=mean, std=std, amp_dtype=dtype)), teacher_hash


def load_trained_teacher(cfg: Config, data: PreparedData, env: DistEnv) -> tuple[nn.Module, str]:
    path = cfg.run_dir / "teacher" / "checkpoint.pt"
    if not (cfg.run_dir / "teacher" / "summary.json").is_file():
        raise CheckpointError(f"no trained teacher in {path.parent}: run `kd-ddp train-teacher` first")
    state = load_checkpoint(path)
    teacher = make_model(cfg, "teacher", data.num_classes, env)
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not hold a {cfg.model.teacher} of this config's size: "
                              f"{str(e).splitlines()[0]}") from None
    teacher.eval()
    return teacher, weights_hash(teacher.state_dict())


def train_stage(cfg: Config, env: DistEnv, data: PreparedData, stage: str) -> dict[str, Any]:
    """Train one of the three models; resumes from its checkpoint, skips if already done."""
    assert stage in STAGES, stage
    role = "teacher" if stage == "teacher" else "student"
    out = cfg.run_dir / stage
    dtype = amp_dtype(cfg, env.device)
    teacher_fn, teacher_hash = (None, "")
    if stage == "student-kd":
        teacher_fn, teacher_hash = _teacher_source(cfg, data, env, dtype)
    fp = stage_fingerprint(cfg, stage, data, teacher_hash)
    fp_hash = fingerprint(fp)

    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fp_hash:
            if env.is_main:
                log.info("%s: already trained (%s), test_acc=%.4f", stage, summary_path, summary["test_acc"])
            return summary

    epochs = cfg.epochs_for(role)
    model = make_model(cfg, role, data.num_classes, env)
    loader = TrainLoader(cfg, data, env)
    test_loader = EvalLoader(cfg, data, env)
    mean, std = data.stats(env.device)
    decay, no_decay = [], []
    for p in model.parameters():  # no weight decay on BatchNorm and biases
        (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr_for(role), momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    total_steps = epochs * len(loader)
    warmup = int(cfg.optim.warmup_epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup))
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)

    start_epoch = start_step = 0
    partial = {"loss_sum": 0.0, "seen": 0, "time_s": 0.0}  # of an epoch interrupted mid-way
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("fingerprint") != fp_hash:
            diffs = describe_differences(fp, state.get("fingerprint_fields", {}), have_name="checkpoint has")
            raise CheckpointError(
                f"{ckpt_path} was made with another config (model, data or loss differ):\n  "
                + "\n  ".join(diffs or ["(a checkpoint without its fields)"])
                + f"\nuse another run.dir, or delete {out} to start this stage over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if env.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], env.device)
        start_epoch = state["epoch"] + 1
        start_step = state.get("step_in_epoch", 0)
        partial = state.get("partial", partial)
        if env.is_main:
            log.info("%s: resuming at epoch %d step %d of %d epochs (%s)", stage, start_epoch + 1, start_step,
                     epochs, ckpt_path)
    history = _read_jsonl(out / "metrics.jsonl")[:start_epoch]

    net: nn.Module = DDP(model) if env.distributed else model
    if cfg.train.compile:
        net = torch.compile(net)

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Drop epochs logged after the checkpoint we resume from: they will be redone.
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        log.info("%s: %d epochs x %d steps, global batch %d on %d rank(s) (process group: %s), device %s, "
                 "amp %s, loader %s", stage, epochs, len(loader), cfg.optim.batch_size, env.world_size,
                 env.backend, env.device, dtype or "off", cfg.data.loader)

    def save(epochs_done: int, step_in_epoch: int = 0, part: dict[str, float] | None = None) -> None:
        """Rank 0 writes the complete training state (atomically: see save_checkpoint)."""
        if env.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                "epoch": epochs_done - 1, "step_in_epoch": step_in_epoch, "partial": part or {},
                "fingerprint": fp_hash, "fingerprint_fields": fp, "config": cfg.to_dict(),
                "num_classes": data.num_classes,
            })

    tracker = start_stage(cfg, stage, env) if env.is_main else StageTracker()
    for record in history:  # a resumed run re-logs the epochs it keeps
        tracker.log_epoch(record)
    show_bar = env.is_main and cfg.tracking.progress and sys.stderr.isatty()
    stage_start = time.perf_counter()
    stop = StopRequest()
    skipped = 0  # steps skipped for a non-finite loss
    for epoch in range(start_epoch, epochs):
        net.train()
        # The augmentation view of this epoch. Cached KD can only replay the kd.views views it
        # has logits for; everything else (the live teacher too: the seed's way) sees a fresh
        # view per epoch, so a live-vs-cached comparison measures what the reuse costs.
        view = epoch % cfg.kd.views if stage == "student-kd" and cfg.kd.teacher == "cached" else epoch
        first = start_step if epoch == start_epoch else 0
        resumed = bool(first) and env.is_main
        t0 = time.perf_counter() - (partial["time_s"] if first else 0.0)
        loss_sum = torch.tensor(partial["loss_sum"] if resumed else 0.0, dtype=torch.float64, device=env.device)
        seen = int(partial["seen"]) if resumed else 0
        bar = tqdm(total=len(loader), initial=first, desc=f"{stage} {epoch + 1}/{epochs}", disable=not show_bar,
                   leave=False)
        for step, (images, labels, idx) in enumerate(loader.epoch(epoch, first), start=first):
            x = normalize(augment(images, idx, seed=cfg.seed, view=view, padding=cfg.data.crop_padding,
                                  flip=cfg.data.flip), mean, std, cfg.train.channels_last)
            with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = net(x)
            if stage == "teacher":
                loss = losses.teacher_loss(logits, labels, cfg.optim.label_smoothing)
            elif stage == "student-normal":
                loss = losses.mse_onehot_loss(logits, labels, cfg.kd.mse_input)
            else:
                assert teacher_fn is not None
                loss = losses.kd_loss(logits, teacher_fn(images, idx, view), labels,
                                      cfg.kd.alpha, cfg.kd.temperature)
            # One host sync and one all-reduce per step carry both flags: "this rank's loss is
            # not finite" and "this rank got SIGTERM". All ranks act on the sums, so they skip or
            # stop at the same step (a rank going its own way would hang DDP). On a GPU the sync
            # costs the launch overlap of one step, the price of naming the step that went bad.
            bad, stopping = (f > 0 for f in all_reduce_sum(
                [float(not torch.isfinite(loss.detach()).item()), float(stop.requested)], env))
            if bad:
                skipped += 1
                where = (f"{stage}: non-finite loss at epoch {epoch + 1} step {step + 1} (batch of samples "
                         f"{idx[:5].tolist()}...)")
                if skipped > cfg.train.nonfinite_skip_limit:
                    raise NonFiniteLoss(f"{where}; stopped (train.nonfinite_skip_limit="
                                        f"{cfg.train.nonfinite_skip_limit}); the last good checkpoint is kept in "
                                        f"{ckpt_path}")
                log.warning("%s: step skipped (%d of at most %d)", where, skipped, cfg.train.nonfinite_skip_limit)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # keep the schedule aligned with the step count
                bar.update()
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double() * len(labels)
            seen += len(labels)
            bar.update()
            if stopping and step + 1 < len(loader):
                # the partial sums are saved summed over ranks; on resume rank 0 alone restarts from them
                part_loss, part_seen = all_reduce_sum([loss_sum.item(), float(seen)], env)
                save(epoch, step + 1, {"loss_sum": part_loss, "seen": part_seen, "time_s": time.perf_counter() - t0})
                barrier(env)
                stop.close()
                raise Preempted(f"{stage}: stopped by signal; checkpointed at epoch {epoch + 1} step {step + 1} "
                                f"in {ckpt_path}; run the same command again to resume")
        bar.close()
        lr = scheduler.get_last_lr()[0]
        train_loss_sum, train_seen = all_reduce_sum([loss_sum.item(), float(seen)], env)
        epoch_time = time.perf_counter() - t0
        test_loss, test_acc = evaluate(model, test_loader, env, mean, std, cfg, dtype)
        record = {
            "epoch": epoch + 1,
            "view": view,
            # every step of the epoch skipped for a non-finite loss: no mean, the check below stops
            "train_loss": train_loss_sum / train_seen if train_seen else math.nan,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "epoch_time_s": round(epoch_time, 3),
            "images_per_s": round(train_seen / epoch_time, 1),
            "eval_time_s": round(time.perf_counter() - t0 - epoch_time, 3),
        }
        if not math.isfinite(record["train_loss"]):
            raise NonFiniteLoss(f"{stage}: non-finite training loss in epoch {epoch + 1}; "
                                     f"the last good checkpoint is kept in {ckpt_path}")
        history.append(record)
        if env.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            tracker.log_epoch(record)
            save(epoch + 1)
            log.info("%s epoch %d/%d: train_loss %.4f test_loss %.4f test_acc %.4f (%.1f s, %.0f img/s)",
                     stage, epoch + 1, epochs, record["train_loss"], test_loss, test_acc, epoch_time,
                     record["images_per_s"])
        barrier(env)

    stop.close()
    summary = {
        "stage": stage,
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        "epochs": epochs,
        "train_time_s": round(sum(r["epoch_time_s"] + r.get("eval_time_s", 0.0) for r in history), 3),
        "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1),
        "world_size": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "machine": machine(env),
        "amp": str(dtype).replace("torch.", "") if dtype else "off",
        "weights_hash": weights_hash(model.state_dict()),
        "fingerprint": fp_hash,
        "session_time_s": round(time.perf_counter() - stage_start, 3),
        "peak_rss_mb": round(rss_mb()[1], 1),  # of this process so far: all stages it ran
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
        if env.device.type == "cuda" else None,
    }
    if stage == "student-kd":
        summary["kd"] = {"alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature,
                         "teacher": cfg.kd.teacher, "views": cfg.kd.views}
    if env.is_main:
        atomic_write_json(summary_path, summary)
    tracker.finish(summary)
    barrier(env)
    return summary
