"""The training loop, for all three models: teacher (CE), student-normal (MSE), student-kd (KD).

`train_stage` reads top to bottom: skip a stage that is done, build a `Trainer` (model,
optimizer, schedule, loaders and the stage's objective: components by role), resume it
from its checkpoint, run its epochs, write the summary. The Trainer reads the same way:
`fit` (the epochs) -> `run_epoch` (the steps, then the evaluation) -> `step_on` (the one
step function; `train_step`, which the benchmarks call, makes its input and calls it) ->
`check` (the host's look at the flags). A teacher
given as `model.teacher_checkpoint` is adopted instead of trained (kd_ddp/teachers.py).
Around it: fingerprints (kd_ddp/fingerprints.py) decide what may be reused, objectives
(kd_ddp/objectives.py) each stage's loss, precision (kd_ddp/precision.py) the autocast.

Data flow of one step: the loader gives NHWC uint8 images with their sample indices ->
the student's input (`augment.StudentInput`: crop + flip, a pure function of seed, view and
index, then normalize to a channels_last float tensor; made by the loader per batch, or with
device-resident data a chunk of batches at a time, bitwise the same; the logits cache makes
its teacher's input with the same function) -> model under autocast -> the stage's objective (for KD,
with the teacher's logits for the same pixels from the cache or a live teacher forward).
Epoch e uses view e; the cached KD student uses view e % kd.views, the views the cache holds.

Host syncs: none in a step. Whether a step's loss is finite is decided on the device, the
update of a bad step is skipped there (fused SGD's `found_inf`, the mechanism GradScaler
uses), and the loss sums and flags stay on the device. The host reads them at the points
marked "host sync" below: the flags every `train.check_every` steps (non-finite steps,
SIGTERM), the epoch's loss sums, the evaluation's sums, and the checkpoint. Nothing that
changes between steps is a Python number in the step (the LR and the view are device
tensors; the seed and view of the augmentation are applied by the loader, before the step),
so on a GPU the step is captured once as a CUDA graph and replayed on static buffers of its
input (kd_ddp/graphed_step.py, train.cuda_graph).
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from kd_ddp import stages
from kd_ddp.augment import StudentInput
from kd_ddp.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint, weights_hash
from kd_ddp.config import Config, fingerprint
from kd_ddp.data import EvalLoader, PreparedData, TrainLoader, resolve_loader, show_bars
from kd_ddp.distributed import DistEnv, all_gather_object, all_reduce_sum, all_reduce_tensor, barrier
from kd_ddp.ensemble import ensemble_facts, ensemble_source, refuse_other_data
from kd_ddp.evaluation import broadcast_buffers, evaluate
from kd_ddp.fingerprints import accepted_fingerprints, finished_summary, refuse_another_config, stage_fingerprint
from kd_ddp.graphed_step import DeviceSchedule, GraphedStep, graph_refusal
from kd_ddp.metrics_io import read_metrics_prefix, write_metrics
from kd_ddp.models import describe, make_model, model_facts, model_name, use_sync_bn
from kd_ddp.objectives import TeacherLogits, make_objective, teacher_logits_source
from kd_ddp.precision import amp_dtype, autocast, precision_name
from kd_ddp.process_memory import rss_mb
from kd_ddp.teacher_logits import TeacherRecord
from kd_ddp.teachers import adopt_teacher
from kd_ddp.tracking import StageTracker, machine, start_stage

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM) and checkpointed mid-epoch; rerunning resumes."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


class StopRequest:
    """SIGTERM (kill, torchrun shutting a group down, Slurm preemption) sets a flag; the loop
    reads it at its next flag check, sums it over ranks, and all ranks checkpoint and stop at
    that step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def install(self) -> None:
        """From here on (the start of training), SIGTERM sets the flag instead of ending the process."""
        if self.previous is None and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def close(self) -> None:
        """Outside training, SIGTERM acts as usual again."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


# -- optimizer and schedule ----------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream (dropout masks): a hash of (seed, rank), so
    ranks draw different masks and every rank's stream is reproducible."""
    return int.from_bytes(hashlib.sha256(f"kd-ddp/{seed}/{rank}".encode()).digest()[:8], "little") >> 1


def make_optimizer(cfg: Config, model: nn.Module, role: str) -> torch.optim.SGD:
    """SGD with momentum, no weight decay on BatchNorm and biases; fused, so that a step can
    be skipped on the device (`found_inf`) without the host looking at the loss."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr_for(role), momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov, fused=True)
    # Momentum buffers start at zero (what SGD's first step amounts to): fused SGD allocates
    # them uninitialized at its first step and a skipped first step would leave them so.
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine annealing to zero: a factor of the peak LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- the step flags, kept on the device -----------------------------------------------


@dataclass
class StepTally:
    """What the steps of a stage leave behind, as device tensors (no host sync to update):
    the epoch's loss sum and sample count over good steps, the stage's count of steps skipped
    for a non-finite loss, the global index of the last such step and of the step that
    crossed `train.nonfinite_skip_limit` (-1: none)."""

    loss_sum: torch.Tensor
    seen: torch.Tensor
    nonfinite: torch.Tensor
    last_bad: torch.Tensor
    crossed: torch.Tensor
    step: torch.Tensor  # global index of the step being taken

    @classmethod
    def start(cls, device: torch.device, step: int, nonfinite: int, loss_sum: float, seen: int) -> StepTally:
        def t(v: float | int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(v, dtype=dtype, device=device)

        return cls(t(loss_sum, torch.float64), t(seen), t(nonfinite), t(-1), t(-1), t(step - 1))

    def add(self, loss: torch.Tensor, bad: torch.Tensor, batch: int, limit: int) -> None:
        self.step += 1
        self.loss_sum += torch.where(bad, 0.0, loss.double() * batch)
        self.seen += torch.where(bad, 0, batch)
        self.nonfinite += bad.long()
        self.last_bad.copy_(torch.where(bad, self.step, self.last_bad))
        self.crossed.copy_(torch.where((self.nonfinite > limit) & (self.crossed < 0), self.step, self.crossed))

    def new_epoch(self) -> None:
        self.loss_sum.zero_()
        self.seen.zero_()


# -- one stage ------------------------------------------------------------------------


def check_interval(cfg: Config, device: torch.device) -> int:
    if cfg.train.check_every:
        return cfg.train.check_every
    return 50 if device.type == "cuda" else 1


class Trainer:
    """One training stage: build -> resume -> epochs of `train_step` -> summary.

    Construct it with the stage's fingerprint (see `train_stage`); `train_step` is usable on
    its own (benchmarks/train_step.py times it on an in-memory batch).
    """

    def __init__(self, cfg: Config, env: DistEnv, data: PreparedData, stage: str,
                 teacher: TeacherLogits | None = None, fp: dict[str, Any] | None = None,
                 accepted: set[str] | None = None) -> None:
        self.cfg, self.env, self.data, self.stage = cfg, env, data, stage
        role = stages.role_of(stage)  # KeyError for a stage that trains no model
        self.out = cfg.run_dir / stage
        self.ckpt_path = self.out / "checkpoint.pt"
        self.dtype = amp_dtype(cfg, env.device)
        self.fp = fp or stage_fingerprint(cfg, stage, data, precision_name(self.dtype))
        self.fp_hash = fingerprint(self.fp)
        # the fingerprints a checkpoint to resume may hold (see accepted_fingerprints)
        self.accepted = accepted or accepted_fingerprints(self.fp, cfg.optim.student_lr)
        self.epochs = cfg.epochs_for(role)
        self.objective = make_objective(cfg, stage, teacher)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        self.model = make_model(cfg, role, data.num_classes, env.device)
        if use_sync_bn(cfg, env.device, env.world_size):
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.facts = {"name": describe(cfg, role), "arch": model_name(cfg, role)} | model_facts(
            self.model, cfg.data.image_size)
        torch.manual_seed(rank_seed(cfg.seed, env.rank))  # each rank its own dropout stream
        self.loader = TrainLoader(cfg, data, env)
        self.test_loader = EvalLoader(cfg, data, env)
        self.mean, self.std = data.stats(env.device)
        self.student_input = StudentInput.of(cfg, self.mean, self.std)
        self.optimizer = make_optimizer(cfg, self.model, role)
        total, warmup = self.epochs * len(self.loader), int(cfg.warmup_for(role) * len(self.loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, total, warmup))
        # The LR and the view as device tensors the step reads (kd_ddp/graphed_step.py): no
        # Python number that changes between steps, so the step can be replayed as a CUDA graph.
        self.total_steps = total
        self.schedule = DeviceSchedule(self.scheduler, total, env.device)
        self.schedule.install(self.optimizer)
        self.view_t = torch.tensor(0, dtype=torch.int64, device=env.device)
        self.view = 0  # the host's copy of view_t
        self.steps_taken = 0  # global steps taken (the device's count is tally.step)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)
        self.net: nn.Module = DDP(self.model) if env.distributed else self.model
        if cfg.train.compile:
            self.net = torch.compile(self.net)
        self.check_every = check_interval(cfg, env.device)
        self.limit = cfg.train.nonfinite_skip_limit
        self.lr = self.scheduler.get_last_lr()[0]  # of the last step taken
        self.start_epoch = self.start_step = 0
        self.partial = {"loss_sum": 0.0, "seen": 0, "time_s": 0.0}  # of an epoch interrupted mid-way
        self.nonfinite = self.reported = 0  # steps skipped so far, and how many of them were logged
        self.history: list[dict[str, Any]] = []
        self.tally = StepTally.start(env.device, 0, 0, 0.0, 0)
        self.runner = self._step_runner(announce=False)  # made again by resume, which says which it is
        self.stop = StopRequest()  # installed where training starts (fit), not here

    # -- the loop, top to bottom: fit -> run_epoch -> step_on -> check --------------

    def fit(self, tracker: StageTracker) -> dict[str, Any]:
        env = self.env
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            # The checkpoint's records: epochs logged after it are dropped (they will be redone),
            # one it holds that a kill kept out of metrics.jsonl is put back.
            write_metrics(self.out / "metrics.jsonl", self.history)
            log.info("%s: %s, %.2f M parameters, %.1f M multiply-adds per image", self.stage, self.facts["name"],
                     self.facts["params"] / 1e6, self.facts["macs_per_image"] / 1e6)
            log.info("%s: %d epochs x %d steps, global batch %d on %d rank(s) (process group: %s), device %s, "
                     "amp %s, loader %s, flags read every %d step(s)", self.stage, self.epochs, len(self.loader),
                     self.cfg.optim.batch_size, env.world_size, env.backend, env.device,
                     precision_name(self.dtype), self.loader.kind, self.check_every)
        for record in self.history:  # a resumed run re-logs the epochs it keeps
            tracker.log_epoch(record)
        show_bar = show_bars(self.cfg, env)
        stage_start = time.perf_counter()
        self.stop.install()  # from here a SIGTERM checkpoints and stops at the next flag check
        try:
            for epoch in range(self.start_epoch, self.epochs):
                first = self.start_step if epoch == self.start_epoch else 0
                with tqdm(total=len(self.loader), initial=first, desc=f"{self.stage} {epoch + 1}/{self.epochs}",
                          disable=not show_bar, leave=False) as bar:
                    record = self.run_epoch(epoch, bar)
                if not math.isfinite(record["train_loss"]):
                    raise NonFiniteLoss(f"{self.stage}: non-finite training loss in epoch {epoch + 1}; "
                                        f"the last good checkpoint is kept in {self.ckpt_path}")
                self.history.append(record)
                self.save(epoch + 1)  # host sync: the record goes into the checkpoint first, then metrics.jsonl
                if env.is_main:
                    write_metrics(self.out / "metrics.jsonl", self.history)
                    tracker.log_epoch(record)
                    log.info("%s epoch %d/%d: train_loss %.4f test_loss %.4f test_acc %.4f (%.1f s, %.0f img/s)",
                             self.stage, epoch + 1, self.epochs, record["train_loss"], record["test_loss"],
                             record["test_acc"], record["epoch_time_s"], record["images_per_s"])
                barrier(env)
        finally:
            self.stop.close()
        return self.summary(time.perf_counter() - stage_start)

    def run_epoch(self, epoch: int, bar: tqdm) -> dict[str, Any]:
        """Train one epoch (from `start_step` when resuming), then evaluate; the metrics record."""
        view = self.view_of(epoch)
        first = self.start_step if epoch == self.start_epoch else 0
        t0 = time.perf_counter() - (self.partial["time_s"] if first else 0.0)
        steps = len(self.loader)
        self.net.train()
        # the student's inputs, made by the loader (a chunk of batches at a time with device-resident data)
        for step, (x, labels, idx) in enumerate(self.loader.inputs(epoch, view, self.student_input, first),
                                                start=first):
            self.step_on(x, labels, idx, view)
            bar.update()
            last = step + 1 == steps
            if (step + 1) % self.check_every == 0 or last:
                stop = self.check(epoch, step)  # host sync: the flags, every train.check_every steps
                if stop and not last:
                    self._stop_mid_epoch(epoch, step, t0)
        # host sync: the epoch's loss sums (it waits for the epoch's steps)
        train_loss_sum, train_seen = all_reduce_tensor(torch.stack(
            [self.tally.loss_sum, self.tally.seen.double()]), self.env).tolist()
        epoch_time = time.perf_counter() - t0
        self.tally.new_epoch()
        broadcast_buffers(self.model, self.env)
        # host sync: the evaluation's sums
        test_loss, test_acc = evaluate(self.model, self.test_loader, self.env, self.mean, self.std, self.cfg,
                                       self.dtype)
        return {
            "epoch": epoch + 1,
            "view": view,
            # every step of the epoch skipped for a non-finite loss: no mean, fit() stops
            "train_loss": train_loss_sum / train_seen if train_seen else math.nan,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": self.lr,  # the one the epoch's last step used
            "epoch_time_s": round(epoch_time, 3),
            "images_per_s": round(train_seen / epoch_time, 1),
            "eval_time_s": round(time.perf_counter() - t0 - epoch_time, 3),
        }

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, view: int) -> None:
        """One optimizer step on a loader batch (NHWC uint8 images), view `view`: the student's
        input (StudentInput), then `step_on`. The loop gets its inputs from the loader instead
        (TrainLoader.inputs: the same pixels, bitwise)."""
        self.step_on(self.student_input(images, idx, view), labels, idx, view)

    def step_on(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, view: int) -> None:
        """One optimizer step on the student's input `x` of a batch, without a host sync.

        A non-finite loss on any rank skips the update on every rank (the flag is all-reduced
        on the device) and is counted in the tally; `check` reads the count. The step itself
        (`_step`) reads the LR and the view from device tensors: it runs eagerly or as a
        replayed CUDA graph (`self.runner`, train.cuda_graph).
        """
        if view != self.view:  # outside the step: the graph reads view_t
            self.view_t.fill_(view)
            self.view = view
        self.lr = self.schedule.host_lr(self.steps_taken)
        self.runner(x, labels, idx)
        self.steps_taken += 1

    def _step(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> None:
        """Forward, loss, backward, the masked update (LR of the tally's step), the tally."""
        loss = self.forward_loss(x, labels, idx, self.view_t)
        bad = all_reduce_tensor((~torch.isfinite(loss.detach())).float(), self.env) > 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.schedule.set(self.tally.step + 1)
        self._update(bad)
        self.tally.add(loss.detach(), bad, len(labels), self.limit)

    def forward_loss(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                     view: torch.Tensor) -> torch.Tensor:
        """The model on the student's input `x` under autocast, then the stage's loss (view: the
        device tensor view_t, which the cached KD student's lookup reads). One region without
        Python numbers: torch.compile(fullgraph=True) takes it whole (tested)."""
        with autocast(self.env.device, self.dtype, cache_enabled=False):
            logits = self.net(x)
        return self.objective(logits, x, labels, idx, view)  # type: ignore[arg-type]  # view: a tensor

    def check(self, epoch: int, step: int) -> bool:
        """The host's look at the flags (every `train.check_every` steps): warn about skipped
        steps, stop past the skip limit naming the step, and agree across ranks on a SIGTERM."""
        nonfinite, last_bad, crossed = torch.stack(
            [self.tally.nonfinite, self.tally.last_bad, self.tally.crossed]).tolist()
        self.nonfinite = nonfinite
        if crossed >= 0:
            raise NonFiniteLoss(f"{self._where(crossed)}; stopped (train.nonfinite_skip_limit={self.limit}); "
                                f"the last good checkpoint is kept in {self.ckpt_path}")
        if nonfinite > self.reported:
            log.warning("%s: step skipped (%d of at most %d)%s", self._where(last_bad), nonfinite, self.limit,
                        f"; {nonfinite - self.reported} since the last check" if nonfinite - self.reported > 1 else "")
            self.reported = nonfinite
        return all_reduce_sum([float(self.stop.requested)], self.env)[0] > 0

    # -- what the loop uses ------------------------------------------------------------

    def _step_runner(self, announce: bool = True) -> GraphedStep:
        """The step, eager or captured as a CUDA graph (train.cuda_graph; kd_ddp/graphed_step.py)."""
        refusal = graph_refusal(self.cfg.train.cuda_graph, self.env.device, self.env.distributed,
                                self.scaler.is_enabled(), self.loader.kind)
        if announce and self.env.is_main and self.env.device.type == "cuda":
            log.info("%s: CUDA graph of the step: %s", self.stage, f"no ({refusal})" if refusal else "yes")
        return GraphedStep(self._step, self.env.device, refusal, self.stage)

    def _update(self, bad: torch.Tensor) -> None:
        """The optimizer step, skipped on the device when `bad`."""
        if self.scaler.is_enabled():
            # fp16: GradScaler already skips (on the device, with fused SGD) a step whose
            # gradients are not finite; a non-finite loss joins that by poisoning one entry.
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            grad[(0,) * grad.ndim].add_(torch.where(bad, math.nan, 0.0))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = bad.float()  # read by fused SGD: 1 skips the whole update
            self.optimizer.step()

    def _where(self, global_step: int) -> str:
        """`stage: non-finite loss at epoch E step S (batch of samples ...)`; the samples come
        from the epoch's order, a pure function, so the device never had to keep them."""
        steps = len(self.loader)
        epoch, step = divmod(global_step, steps)
        bpr = self.loader.batch_per_rank
        samples = self.loader.order(epoch=epoch)[step * bpr: step * bpr + 5].tolist()
        return f"{self.stage}: non-finite loss at epoch {epoch + 1} step {step + 1} (batch of samples {samples}...)"

    def view_of(self, epoch: int) -> int:
        """The augmentation view of an epoch. Cached KD can only replay the kd.views views it
        has logits for; everything else (the live teacher too: the seed's way) sees a fresh
        view per epoch, so a live-vs-cached comparison measures what the reuse costs."""
        if stages.get(self.stage).distills and self.cfg.kd.teacher == "cached":
            return epoch % self.cfg.kd.views
        return epoch

    def _stop_mid_epoch(self, epoch: int, step: int, t0: float) -> None:
        """SIGTERM: checkpoint after this step (partial sums summed over ranks), then stop."""
        part_loss, part_seen = all_reduce_tensor(torch.stack(
            [self.tally.loss_sum, self.tally.seen.double()]), self.env).tolist()
        self.save(epoch, step + 1, {"loss_sum": part_loss, "seen": part_seen, "time_s": time.perf_counter() - t0})
        barrier(self.env)
        raise Preempted(f"{self.stage}: stopped by signal; checkpointed at epoch {epoch + 1} step {step + 1} "
                        f"in {self.ckpt_path}; run the same command again to resume")

    # -- resume, save, summary -----------------------------------------------------------

    def resume(self) -> None:
        """Continue from the stage's checkpoint, if any (refused when made under another config)."""
        if self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path)
            refuse_another_config(state, self.fp, self.ckpt_path, self.accepted)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            # the checkpoint's schedule (its base LRs) on the device, its tensors the LRs again
            self.schedule = DeviceSchedule(self.scheduler, self.total_steps, self.env.device)
            self.schedule.install(self.optimizer)
            self.scaler.load_state_dict(state["scaler"])
            self._restore_rng(state["rng"])
            self.start_epoch = state["epoch"] + 1
            self.start_step = state.get("step_in_epoch", 0)
            self.partial = state.get("partial") or self.partial
            self.nonfinite = self.reported = state.get("nonfinite_steps", 0)
            self.lr = float(self.scheduler.get_last_lr()[0])
            self.history = self._resumed_history(state)
            if self.env.is_main:
                log.info("%s: resuming at epoch %d step %d of %d epochs (%s)", self.stage, self.start_epoch + 1,
                         self.start_step, self.epochs, self.ckpt_path)
        steps = len(self.loader)
        # a resumed epoch restarts from rank-summed partial sums; rank 0 alone carries them
        carried = self.env.is_main and self.start_step > 0
        self.steps_taken = self.start_epoch * steps + self.start_step
        self.tally = StepTally.start(self.env.device, self.steps_taken, self.nonfinite,
                                     self.partial["loss_sum"] if carried else 0.0,
                                     int(self.partial["seen"]) if carried else 0)
        self.runner = self._step_runner()  # captured (if at all) after the tally and the state it updates

    def _resumed_history(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The records of the epochs the checkpoint holds: its own copy (saved with it, so the
        two always agree), else, for a checkpoint saved before it had one, metrics.jsonl's
        first records, which a kill between the checkpoint and the append may have left short."""
        if "history" in state:
            return list(state["history"])
        history = read_metrics_prefix(self.out / "metrics.jsonl")[: self.start_epoch]
        if len(history) < self.start_epoch and self.env.is_main:
            log.warning("%s: %s holds the records of %d of the %d epochs %s finished (it was killed between the "
                        "two); the others are lost", self.stage, self.out / "metrics.jsonl", len(history),
                        self.start_epoch, self.ckpt_path)
        return history

    def _rng_state(self) -> dict[str, torch.Tensor | None]:
        cuda = self.env.device.type == "cuda"
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.env.device) if cuda else None}

    def _restore_rng(self, per_rank: list[dict[str, torch.Tensor | None]]) -> None:
        if len(per_rank) != self.env.world_size:
            # another world size: the batches per rank differ anyway, so no bitwise resume
            log.warning("%s: checkpoint of %d rank(s) resumed on %d: fresh random streams", self.stage,
                        len(per_rank), self.env.world_size)
            torch.manual_seed(rank_seed(self.cfg.seed, self.env.rank) ^ self.start_epoch)
            return
        mine = per_rank[self.env.rank]
        torch.set_rng_state(mine["cpu"])
        if self.env.device.type == "cuda" and mine["cuda"] is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.env.device)

    def save(self, epochs_done: int, step_in_epoch: int = 0, part: dict[str, float] | None = None) -> None:
        """The complete training state, every rank's random stream included; rank 0 writes it
        (atomically: see save_checkpoint). Every rank must call it (it gathers the streams)."""
        rng = all_gather_object(self._rng_state(), self.env)
        if self.env.is_main:
            # float LRs, as a LambdaLR stepped once per step leaves them: the format of every version
            optimizer, scheduler = self.schedule.checkpoint_states(self.optimizer, self.scheduler, self.steps_taken)
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": optimizer,
                "scheduler": scheduler, "scaler": self.scaler.state_dict(), "rng": rng,
                "epoch": epochs_done - 1, "step_in_epoch": step_in_epoch, "partial": part or {},
                "nonfinite_steps": self.nonfinite, "fingerprint": self.fp_hash, "fingerprint_fields": self.fp,
                "config": self.cfg.to_dict(), "num_classes": self.data.num_classes,
                # the records of the epochs done: metrics.jsonl is rewritten from them (write_metrics)
                "history": self.history,
            })

    def final_test_metrics(self) -> tuple[float, float]:
        """(test_loss, test_acc) of the trained model: its last epoch's record, or, where a
        checkpoint saved before it held its records came without that one (_resumed_history),
        the model evaluated now (the checkpoint's weights: what that epoch's evaluation saw)."""
        if self.history and self.history[-1]["epoch"] == self.epochs:
            return self.history[-1]["test_loss"], self.history[-1]["test_acc"]
        return evaluate(self.model, self.test_loader, self.env, self.mean, self.std, self.cfg, self.dtype)

    def summary(self, session_s: float) -> dict[str, Any]:
        env, history = self.env, self.history
        test_loss, test_acc = self.final_test_metrics()
        summary: dict[str, Any] = {
            "stage": self.stage,
            "model": self.facts,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "epochs": self.epochs,
            "train_time_s": round(sum(r["epoch_time_s"] + r.get("eval_time_s", 0.0) for r in history), 3),
            "images_per_s": round(sum(r["images_per_s"] for r in history) / max(1, len(history)), 1),
            "world_size": env.world_size,
            "backend": env.backend,
            "device": str(env.device),
            "machine": machine(env),
            "amp": precision_name(self.dtype),
            "loader": self.loader.kind,
            "nonfinite_steps": self.nonfinite,
            "weights_hash": weights_hash(self.model.state_dict()),
            "fingerprint": self.fp_hash,
            "session_time_s": round(session_s, 3),
            "peak_rss_mb": round(rss_mb()[1], 1),  # of this process so far: all stages it ran
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
            if env.device.type == "cuda" else None,
        }
        if stages.get(self.stage).distills:
            kd = self.cfg.kd
            summary["kd"] = {"alpha": kd.alpha, "temperature": kd.temperature, "teacher": kd.teacher,
                             "views": kd.views, "cache_dtype": kd.cache_dtype if kd.teacher == "cached" else None}
        return summary

    def close(self) -> None:
        self.stop.close()


def train_stage(cfg: Config, env: DistEnv, data: PreparedData, stage: str) -> dict[str, Any]:
    """Train one model; resumes from its checkpoint, skips if already done. A teacher given as
    `model.teacher_checkpoint` is adopted instead (adopt_teacher). An ensemble member (teacher-<i>)
    takes its member config (kd_ddp.ensemble.member_config) as `cfg`."""
    if stages.get(stage).member and cfg.model.teacher_checkpoint:
        refuse_other_data(cfg, stages.get(stage).member, data)
        return adopt_teacher(cfg, env, data, stage)
    dtype = amp_dtype(cfg, env.device)
    teacher: TeacherLogits | None = None
    record: TeacherRecord | list[TeacherRecord] | None = None
    ensemble: dict[str, Any] | None = None
    if stages.get(stage).ensemble:
        teacher, record, members = ensemble_source(cfg, data, env, dtype)
        ensemble = {"models": members}
    elif stages.get(stage).distills:
        teacher, record = teacher_logits_source(cfg, data, env, dtype)
    fp = stage_fingerprint(cfg, stage, data, precision_name(dtype), record)
    legacy_ok = isinstance(record, TeacherRecord) and record.legacy_ok
    accepted = accepted_fingerprints(fp, cfg.optim.student_lr, legacy_ok)
    summary_path = cfg.run_dir / stage / "summary.json"
    done = finished_summary(summary_path, accepted)
    if done is not None:
        if env.is_main:
            log.info("%s: already trained (%s), test_acc=%.4f", stage, summary_path, done["test_acc"])
        return done
    resolve_loader(cfg, data, env.device)  # a loader that cannot run fails here, before any work
    trainer = Trainer(cfg, env, data, stage, teacher, fp, accepted)
    tracker: StageTracker = StageTracker()
    try:
        trainer.resume()
        tracker = start_stage(cfg, stage, env) if env.is_main else tracker
        summary = trainer.fit(tracker)
        if ensemble is not None:  # the ensemble's own accuracy beside its student's (every rank evaluates)
            summary["ensemble"] = ensemble_facts(cfg, data, env, ensemble["models"], record, dtype)
        if env.is_main:
            atomic_write_json(summary_path, summary)
        tracker.finish(summary)
    except BaseException as e:
        tracker.abort(143 if isinstance(e, Preempted) else 1)
        raise
    finally:
        trainer.close()
    barrier(env)
    return summary
