"""The training loop, for all three runs: teacher (CE), student-normal (MSE), student-kd (KD).

`train_stage` reads top to bottom: skip a stage that is done, build a `Trainer` (model,
optimizer, schedule, loaders and the stage's objective: components by role), resume it
from its checkpoint, run its epochs, write the summary. An epoch is a loop of
`Trainer.train_step`, the one step function the benchmarks call too. A teacher given as
`model.teacher_checkpoint` is adopted instead of trained (`adopt_teacher`: evaluated, then
kept as the run dir's teacher). `preflight` builds and checks the models before any data is
prepared (kd_ddp/models.py); with `train.sync_bn` the BatchNorm layers become SyncBatchNorm.

Data flow of one step: the loader gives NHWC uint8 images with their sample indices ->
`augment` (crop + flip, a pure function of seed, view and index) -> `normalize` to a
channels_last float tensor -> model under autocast -> the stage's objective (for KD, with
the teacher's logits for the same pixels from the cache or from a live teacher forward).
Epoch e uses view e; the cached KD student uses view e % kd.views, the views the cache holds.

Host syncs: none in a step. Whether a step's loss is finite is decided on the device, the
update of a bad step is skipped there (fused SGD's `found_inf`, the mechanism GradScaler
uses), and the loss sums and flags stay on the device; the host reads the flags every
`train.check_every` steps (non-finite steps, SIGTERM) and the sums once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from kd_ddp import losses
from kd_ddp.augment import augment, normalize
from kd_ddp.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    load_weights_file,
    save_checkpoint,
    weights_hash,
)
from kd_ddp.config import Config, ConfigError, describe_differences, fingerprint
from kd_ddp.data import EvalLoader, PreparedData, TrainLoader, prepared_dir, resolve_loader
from kd_ddp.distributed import DistEnv, all_gather_object, all_reduce_sum, all_reduce_tensor, barrier
from kd_ddp.models import architecture, build_model, check_models, describe, model_facts, model_name
from kd_ddp.process_memory import rss_mb
from kd_ddp.teacher_logits import RECORD_FIELDS, LogitsCache, TeacherRecord, cache_lock
from kd_ddp.tracking import StageTracker, machine, start_stage

log = logging.getLogger(__name__)

STAGES = ("teacher", "student-normal", "student-kd")


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


def precision_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype else "off"


# -- model, optimizer, schedule -------------------------------------------------------


def make_model(cfg: Config, role: str, num_classes: int, env: DistEnv) -> nn.Module:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, role, num_classes).to(env.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def use_sync_bn(cfg: Config, env: DistEnv) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm (train.sync_bn, with more than one rank);
    refused on CPUs, where torch's SyncBatchNorm does not run."""
    if not cfg.train.sync_bn or env.world_size == 1:
        return False
    if env.device.type != "cuda":
        raise ConfigError(f"train.sync_bn=true needs CUDA devices: torch's SyncBatchNorm does not run on "
                          f"{env.device.type} ({env.world_size} ranks here); drop it, or train on GPUs")
    return True


def stage_roles(stage: str, mode: str) -> list[str]:
    """The models a CLI stage builds: the KD student needs its teacher (cached or live)."""
    return {"train-teacher": ["teacher"], "cache-logits": ["teacher"], "pipeline": ["teacher", "student"],
            "train-student": ["teacher", "student"] if mode == "kd" else ["student"]}.get(stage, [])


def provisional_classes(cfg: Config) -> int:
    """The class count to check models with before the data is prepared: the synthetic
    source's, the prepared data's when it already is, else CIFAR-10's 10 (the real count is
    checked again when the model is built for training)."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_classes
    try:
        return len(json.loads((prepared_dir(cfg) / "meta.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 10


def preflight(cfg: Config, env: DistEnv, stage: str, mode: str = "kd") -> None:
    """What can be refused before any data is prepared, on every rank: each model the stage
    builds (name, import, what the callable returns, its output shape), the teacher file to
    adopt, train.sync_bn on this device."""
    roles = stage_roles(stage, mode)
    check_models(cfg, roles, provisional_classes(cfg))
    if cfg.model.teacher_checkpoint and stage in ("train-teacher", "pipeline"):
        source = Path(cfg.model.teacher_checkpoint)
        refuse_another_architecture(cfg, read_teacher_file(source)[1], source)
    if roles:
        use_sync_bn(cfg, env)


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


# optim fields of one role (teacher or students): a stage's fingerprint has them as its
# resolved "epochs", "lr" and "warmup_epochs"
PER_ROLE_OPTIM = ("teacher_epochs", "student_epochs", "student_lr", "student_warmup_epochs")


def stage_fingerprint(cfg: Config, stage: str, data: PreparedData, precision: str,
                      teacher: TeacherRecord | None = None) -> dict[str, Any]:
    """Everything that changes a stage's result; a checkpoint or summary made under another
    is refused (checkpoint) or not reused (summary)."""
    role = "teacher" if stage == "teacher" else "student"
    fp: dict[str, Any] = {
        "stage": stage,
        "data": data.content_hash,
        "augmentation": [cfg.data.crop_padding, cfg.data.flip],
        "model": architecture(cfg, role),
        # the stage's own epochs, LR and warm-up, not the other role's: a student sweep over
        # optim.student_lr reuses its finished teacher
        "optim": {k: v for k, v in vars(cfg.optim).items() if k not in PER_ROLE_OPTIM}
        | {"epochs": cfg.epochs_for(role), "lr": cfg.lr_for(role), "warmup_epochs": cfg.warmup_for(role)},
        "seed": cfg.seed,
        "precision": precision,  # autocast dtype actually used (train.amp=auto resolves per device)
    }
    if cfg.train.sync_bn:  # only when on: fingerprints made before the field existed stay valid
        fp["sync_bn"] = True
    if stage == "student-normal":
        fp["mse_input"] = cfg.kd.mse_input
    if stage == "student-kd":
        # the teacher's whole record (weights, architecture, the precision of its logits), not
        # its weights alone: another architecture of the same parameters gives other logits
        record = teacher.key() if teacher else {"teacher_weights": ""}
        fp["kd"] = {"alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature, "teacher": cfg.kd.teacher} | record
        if cfg.kd.teacher == "cached":  # a live teacher reads no cache: its views and dtype do not matter
            fp["kd"] |= {"views": cfg.kd.views, "cache_dtype": cfg.kd.cache_dtype}
    return fp


# -- the objective of each stage ------------------------------------------------------

# (student logits, the normalized input, labels, sample indices, view) -> scalar loss
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def load_trained_teacher(cfg: Config, data: PreparedData, env: DistEnv) -> tuple[nn.Module, TeacherRecord]:
    """The run dir's teacher, and its record: weights hash, architecture, and the precision
    this run computes its logits in. A checkpoint that records another architecture than this
    config's teacher is refused, even when its weights fit (same parameters, other stem)."""
    path = cfg.run_dir / "teacher" / "checkpoint.pt"
    if not (cfg.run_dir / "teacher" / "summary.json").is_file():
        raise CheckpointError(f"no trained teacher in {path.parent}: run `kd-ddp train-teacher` first")
    state = load_checkpoint(path)
    held = state.get("fingerprint_fields", {})
    teacher = make_model(cfg, "teacher", data.num_classes, env)
    load_weights_into(teacher, state["model"], path, cfg, held=held.get("model"))
    refuse_another_architecture(cfg, held.get("model"), path)
    teacher.eval()
    precision = precision_name(amp_dtype(cfg, env.device))
    model = architecture(cfg, "teacher")
    record = TeacherRecord(weights_hash(teacher.state_dict()), model, precision,
                           legacy_ok=held.get("model") == model and held.get("precision") == precision)
    return teacher, record


def refuse_another_architecture(cfg: Config, held: Any, path: Path) -> None:
    """CheckpointError when a teacher file records another architecture than this config's
    teacher (None: it records none). Its weights may still load (torchvision's stem or the
    CIFAR one have the same parameters), but the model would not be the one trained."""
    want = architecture(cfg, "teacher")
    if held is not None and held != want:
        raise CheckpointError(f"{path} holds a teacher made as {held!r}, this config's teacher is {want!r}: "
                              "use the teacher's model settings, or another run.dir")


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, cfg: Config,
                      held: Any = None) -> None:
    """`model.load_state_dict(state)`, strict; a mismatch names the teacher this config builds
    and, when the file records it (`held`), the architecture the file was made with."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (f"it holds {held!r}, this config's teacher is {architecture(cfg, 'teacher')!r}"
                  if held is not None and held != architecture(cfg, "teacher") else " ".join(lines[:2])[:600])
        raise CheckpointError(f"{path} does not hold a {cfg.model.teacher} of this config's size: {detail}") from None


def read_teacher_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights in `model.teacher_checkpoint`: a plain state_dict file, or a kd-ddp
    checkpoint (its "model"). Keys saved from a DDP-wrapped model ("module." prefix) are taken too."""
    return read_teacher_file(path)[0]


def read_teacher_file(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """`read_teacher_weights`, and the architecture the file records (a kd-ddp checkpoint's
    fingerprint_fields["model"]; None for a plain state_dict, which records none)."""
    where = f"model.teacher_checkpoint {path}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    try:
        state = load_weights_file(path, "model.teacher_checkpoint")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where} is not a file torch.load reads ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    held = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        fields = state.get("fingerprint_fields")
        held = fields.get("model") if isinstance(fields, dict) else None
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} holds no state_dict: expected a dict of tensors, as "
                              "torch.save(model.state_dict(), path) writes, or a kd-ddp checkpoint")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, held


TeacherLogits = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x, indices, view) -> logits


def teacher_logits_source(cfg: Config, data: PreparedData, env: DistEnv,
                          dtype: torch.dtype | None) -> tuple[TeacherLogits, TeacherRecord]:
    """The KD student's teacher logits for a batch (from the cache, or a live forward on the
    student's own input `x`: the same pixels), and the teacher's record. The live teacher runs
    in the student's precision `dtype`, the one its record names (amp_dtype of this run)."""
    teacher, record = load_trained_teacher(cfg, data, env)
    if cfg.kd.teacher == "cached":
        with cache_lock(cfg, env):  # the lock cache-logits builds under: never a cache half rebuilt
            cache = LogitsCache(cfg, data, record, env.device)
        return (lambda x, idx, view: cache.lookup(view, idx)), record

    @torch.no_grad()
    def live(x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return teacher(x).float()

    return live, record


def make_objective(cfg: Config, stage: str, teacher: TeacherLogits | None) -> Objective:
    """The stage's loss, chosen once: CE for the teacher, MSE on one-hot labels for the
    normal student, the KD loss (with the teacher's logits for the same view) for the other."""
    if stage == "teacher":
        smoothing = cfg.optim.label_smoothing
        return lambda logits, x, labels, idx, view: losses.teacher_loss(logits, labels, smoothing)
    if stage == "student-normal":
        on = cfg.kd.mse_input
        return lambda logits, x, labels, idx, view: losses.mse_onehot_loss(logits, labels, on)
    assert teacher is not None
    alpha, temperature = cfg.kd.alpha, cfg.kd.temperature
    return lambda logits, x, labels, idx, view: losses.kd_loss(logits, teacher(x, idx, view), labels,
                                                               alpha, temperature)


# -- evaluation -----------------------------------------------------------------------


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics). In training each
    rank's last forward updated its own; evaluated as they are, each rank's shard of the
    test set would meet another model, and the metrics would depend on the world size.
    Rank 0's are the ones its checkpoint holds."""
    if env.distributed and env.world_size > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, env: DistEnv, mean: torch.Tensor, std: torch.Tensor,
             cfg: Config, dtype: torch.dtype | None) -> tuple[float, float]:
    """(mean CE loss, accuracy) over the whole split: each rank its shard, then summed."""
    model.eval()
    # summed on the device and read once: a read per batch would stall a GPU per batch
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
    for images, labels, _ in loader:
        x = normalize(images, mean, std, cfg.train.channels_last)
        with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        sums[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
    loss_sum, correct, total = all_reduce_tensor(sums, env).tolist()
    return loss_sum / total, correct / total


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, up to the first line that is not one (an older kd-ddp
    appended to it, and a kill could leave a last line half written)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, whole and atomically (temp file + rename): after any kill it holds the
    records of the checkpoint before this one or of this one, never a half line."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())


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
        assert stage in STAGES, stage
        self.cfg, self.env, self.data, self.stage = cfg, env, data, stage
        role = "teacher" if stage == "teacher" else "student"
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
        self.model = make_model(cfg, role, data.num_classes, env)
        if use_sync_bn(cfg, env):
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.facts = {"name": describe(cfg, role), "arch": model_name(cfg, role)} | model_facts(
            self.model, cfg.data.image_size)
        torch.manual_seed(rank_seed(cfg.seed, env.rank))  # each rank its own dropout stream
        self.loader = TrainLoader(cfg, data, env)
        self.test_loader = EvalLoader(cfg, data, env)
        self.mean, self.std = data.stats(env.device)
        self.optimizer = make_optimizer(cfg, self.model, role)
        total, warmup = self.epochs * len(self.loader), int(cfg.warmup_for(role) * len(self.loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, total, warmup))
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
        self.stop = StopRequest()

    # -- resume and save ------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the stage's checkpoint, if any (refused when made under another config)."""
        if self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path)
            refuse_another_config(state, self.fp, self.ckpt_path, self.accepted)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self._restore_rng(state["rng"])
            self.start_epoch = state["epoch"] + 1
            self.start_step = state.get("step_in_epoch", 0)
            self.partial = state.get("partial") or self.partial
            self.nonfinite = self.reported = state.get("nonfinite_steps", 0)
            self.lr = self.scheduler.get_last_lr()[0]
            self.history = self._resumed_history(state)
            if self.env.is_main:
                log.info("%s: resuming at epoch %d step %d of %d epochs (%s)", self.stage, self.start_epoch + 1,
                         self.start_step, self.epochs, self.ckpt_path)
        steps = len(self.loader)
        # a resumed epoch restarts from rank-summed partial sums; rank 0 alone carries them
        carried = self.env.is_main and self.start_step > 0
        self.tally = StepTally.start(self.env.device, self.start_epoch * steps + self.start_step, self.nonfinite,
                                     self.partial["loss_sum"] if carried else 0.0,
                                     int(self.partial["seen"]) if carried else 0)

    def _resumed_history(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The records of the epochs the checkpoint holds: its own copy (saved with it, so the
        two always agree), else, for a checkpoint saved before it had one, metrics.jsonl's
        first records, which a kill between the checkpoint and the append may have left short."""
        if "history" in state:
            return list(state["history"])
        history = _read_jsonl(self.out / "metrics.jsonl")[: self.start_epoch]
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
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "epoch": epochs_done - 1, "step_in_epoch": step_in_epoch, "partial": part or {},
                "nonfinite_steps": self.nonfinite, "fingerprint": self.fp_hash, "fingerprint_fields": self.fp,
                "config": self.cfg.to_dict(), "num_classes": self.data.num_classes,
                # the records of the epochs done: metrics.jsonl is rewritten from them (write_metrics)
                "history": self.history,
            })

    # -- one step -------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, view: int) -> None:
        """One optimizer step on a batch (NHWC uint8 images of view `view`), without a host sync.

        A non-finite loss on any rank skips the update on every rank (the flag is all-reduced
        on the device) and is counted in the tally; `check` reads the count.
        """
        cfg = self.cfg
        x = normalize(augment(images, idx, seed=cfg.seed, view=view, padding=cfg.data.crop_padding,
                              flip=cfg.data.flip), self.mean, self.std, cfg.train.channels_last)
        with torch.autocast(self.env.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.net(x)
        loss = self.objective(logits, x, labels, idx, view)
        bad = all_reduce_tensor((~torch.isfinite(loss.detach())).float(), self.env) > 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._update(bad)
        self.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.tally.add(loss.detach(), bad, len(labels), self.limit)

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

    def _where(self, global_step: int) -> str:
        """`stage: non-finite loss at epoch E step S (batch of samples ...)`; the samples come
        from the epoch's order, a pure function, so the device never had to keep them."""
        steps = len(self.loader)
        epoch, step = divmod(global_step, steps)
        bpr = self.loader.batch_per_rank
        samples = self.loader.order(epoch=epoch)[step * bpr: step * bpr + 5].tolist()
        return f"{self.stage}: non-finite loss at epoch {epoch + 1} step {step + 1} (batch of samples {samples}...)"

    # -- one epoch ------------------------------------------------------------------------

    def view_of(self, epoch: int) -> int:
        """The augmentation view of an epoch. Cached KD can only replay the kd.views views it
        has logits for; everything else (the live teacher too: the seed's way) sees a fresh
        view per epoch, so a live-vs-cached comparison measures what the reuse costs."""
        if self.stage == "student-kd" and self.cfg.kd.teacher == "cached":
            return epoch % self.cfg.kd.views
        return epoch

    def run_epoch(self, epoch: int, bar: tqdm) -> dict[str, Any]:
        """Train one epoch (from `start_step` when resuming), then evaluate; the metrics record."""
        view = self.view_of(epoch)
        first = self.start_step if epoch == self.start_epoch else 0
        t0 = time.perf_counter() - (self.partial["time_s"] if first else 0.0)
        steps = len(self.loader)
        self.net.train()
        for step, (images, labels, idx) in enumerate(self.loader.epoch(epoch, first), start=first):
            self.train_step(images, labels, idx, view)
            bar.update()
            if ((step + 1) % self.check_every == 0 or step + 1 == steps) and self.check(epoch, step) \
                    and step + 1 < steps:
                self._stop_mid_epoch(epoch, step, t0)
        train_loss_sum, train_seen = all_reduce_tensor(torch.stack(
            [self.tally.loss_sum, self.tally.seen.double()]), self.env).tolist()  # waits for the epoch's steps
        epoch_time = time.perf_counter() - t0
        self.tally.new_epoch()
        broadcast_buffers(self.model, self.env)
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

    def _stop_mid_epoch(self, epoch: int, step: int, t0: float) -> None:
        """SIGTERM: checkpoint after this step (partial sums summed over ranks), then stop."""
        part_loss, part_seen = all_reduce_tensor(torch.stack(
            [self.tally.loss_sum, self.tally.seen.double()]), self.env).tolist()
        self.save(epoch, step + 1, {"loss_sum": part_loss, "seen": part_seen, "time_s": time.perf_counter() - t0})
        barrier(self.env)
        raise Preempted(f"{self.stage}: stopped by signal; checkpointed at epoch {epoch + 1} step {step + 1} "
                        f"in {self.ckpt_path}; run the same command again to resume")

    # -- the whole stage ------------------------------------------------------------------

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
        show_bar = env.is_main and self.cfg.tracking.progress and sys.stderr.isatty()
        stage_start = time.perf_counter()
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_step if epoch == self.start_epoch else 0
            with tqdm(total=len(self.loader), initial=first, desc=f"{self.stage} {epoch + 1}/{self.epochs}",
                      disable=not show_bar, leave=False) as bar:
                record = self.run_epoch(epoch, bar)
            if not math.isfinite(record["train_loss"]):
                raise NonFiniteLoss(f"{self.stage}: non-finite training loss in epoch {epoch + 1}; "
                                    f"the last good checkpoint is kept in {self.ckpt_path}")
            self.history.append(record)
            self.save(epoch + 1)  # the record goes into the checkpoint first, then into metrics.jsonl
            if env.is_main:
                write_metrics(self.out / "metrics.jsonl", self.history)
                tracker.log_epoch(record)
                log.info("%s epoch %d/%d: train_loss %.4f test_loss %.4f test_acc %.4f (%.1f s, %.0f img/s)",
                         self.stage, epoch + 1, self.epochs, record["train_loss"], record["test_loss"],
                         record["test_acc"], record["epoch_time_s"], record["images_per_s"])
            barrier(env)
        return self.summary(time.perf_counter() - stage_start)

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
        if self.stage == "student-kd":
            kd = self.cfg.kd
            summary["kd"] = {"alpha": kd.alpha, "temperature": kd.temperature, "teacher": kd.teacher,
                             "views": kd.views, "cache_dtype": kd.cache_dtype if kd.teacher == "cached" else None}
        return summary

    def close(self) -> None:
        self.stop.close()


def accepted_fingerprints(fp: dict[str, Any], student_lr: float = 0.0, teacher_legacy_ok: bool = False) -> set[str]:
    """The hash of `fp`, and the ones the same stage was recorded under before. Run dirs made
    before stay valid: a finished stage is kept, a checkpoint resumed (and saved again under
    the new hash).
    - Before a stage's optim part held only its own role's fields (2026-11-29, when
      optim.student_warmup_epochs came), it also held optim.student_lr, 0 unless set.
    - Before the KD student's teacher was identified by its whole record (2026-12), its kd
      part held the teacher's weights hash alone: accepted only when `teacher_legacy_ok`
      (TeacherRecord.legacy_ok: the teacher checkpoint records this model and precision)."""
    forms = [fp]
    if teacher_legacy_ok and "kd" in fp:
        forms.append(fp | {"kd": {k: v for k, v in fp["kd"].items() if k not in RECORD_FIELDS}})
    hashes = set()
    for form in forms:
        hashes.add(fingerprint(form))
        if "optim" in form:
            hashes.add(fingerprint(form | {"optim": form["optim"] | {"student_lr": student_lr}}))
    return hashes


def refuse_another_config(state: dict[str, Any], fp: dict[str, Any], path: Path, accepted: set[str]) -> None:
    """CheckpointError naming what differs when checkpoint `state` was made under another
    fingerprint than `fp` (or one of the `accepted` hashes, see accepted_fingerprints)."""
    if state.get("fingerprint") in accepted:
        return
    diffs = describe_differences(fp, state.get("fingerprint_fields", {}), have_name="checkpoint has")
    raise CheckpointError(
        f"{path} was made with another config (model, data, loss or precision differ):\n  "
        + "\n  ".join(diffs or ["(a checkpoint without its fields)"])
        + f"\nuse another run.dir, or delete {path.parent} to start this stage over")


def finished_summary(path: Path, hashes: set[str]) -> dict[str, Any] | None:
    """The stage's summary if it was made with one of these fingerprints (accepted_fingerprints),
    else None (train again)."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("fingerprint") in hashes else None


def adopt_teacher(cfg: Config, env: DistEnv, data: PreparedData) -> dict[str, Any]:
    """train-teacher with `model.teacher_checkpoint`: no training. The file's weights go into
    this config's teacher, which is evaluated on the test split as a trained one is, and kept
    as the run dir's teacher checkpoint (fingerprinted by the weights hash), so that the
    logits cache, the KD student and the report take it as they take a trained teacher. A
    trained teacher already in the run dir is never overwritten (refused, as resuming is)."""
    source = Path(cfg.model.teacher_checkpoint)
    dtype = amp_dtype(cfg, env.device)
    teacher = make_model(cfg, "teacher", data.num_classes, env)
    weights, recorded = read_teacher_file(source)
    load_weights_into(teacher, weights, source, cfg, held=recorded)
    refuse_another_architecture(cfg, recorded, source)
    fp = {"stage": "teacher", "adopted": weights_hash(teacher.state_dict()), "data": data.content_hash,
          "model": architecture(cfg, "teacher"), "precision": precision_name(dtype)}
    out = cfg.run_dir / "teacher"
    done = finished_summary(out / "summary.json", accepted_fingerprints(fp))
    if done is not None:
        if env.is_main:
            log.info("teacher: already adopted from %s, test_acc=%.4f", source, done["test_acc"])
        return done
    if (out / "checkpoint.pt").is_file():
        held = load_checkpoint(out / "checkpoint.pt")
        if "adopted" not in held.get("fingerprint_fields", {}):  # a trained teacher: keep it
            refuse_another_config(held, fp, out / "checkpoint.pt", accepted_fingerprints(fp))
    tracker = start_stage(cfg, "teacher", env) if env.is_main else StageTracker()
    try:
        summary = _evaluate_adopted(cfg, env, data, teacher, source, fp)
    except BaseException:
        tracker.abort(1)
        raise
    tracker.finish(summary)
    barrier(env)
    return summary


def _evaluate_adopted(cfg: Config, env: DistEnv, data: PreparedData, teacher: nn.Module, source: Path,
                      fp: dict[str, Any]) -> dict[str, Any]:
    """The adopted teacher's test accuracy (every rank its shard), its summary; rank 0 writes
    the teacher's checkpoint, an empty metrics.jsonl (no epochs) and the summary."""
    dtype = amp_dtype(cfg, env.device)
    out = cfg.run_dir / "teacher"
    mean, std = data.stats(env.device)
    start = time.perf_counter()
    test_loss, test_acc = evaluate(teacher, EvalLoader(cfg, data, env), env, mean, std, cfg, dtype)
    summary = {
        "stage": "teacher", "adopted_from": str(source.resolve()), "test_acc": test_acc, "test_loss": test_loss,
        "epochs": 0, "train_time_s": 0.0, "images_per_s": 0.0,
        "eval_time_s": round(time.perf_counter() - start, 3), "world_size": env.world_size,
        "backend": env.backend, "device": str(env.device), "machine": machine(env), "amp": precision_name(dtype),
        "model": {"name": describe(cfg, "teacher"), "arch": cfg.model.teacher}
        | model_facts(teacher, cfg.data.image_size),
        "weights_hash": fp["adopted"], "fingerprint": fingerprint(fp),
    }
    if env.is_main:
        save_checkpoint(out / "checkpoint.pt", {
            "model": teacher.state_dict(), "fingerprint": fingerprint(fp), "fingerprint_fields": fp,
            "config": cfg.to_dict(), "num_classes": data.num_classes, "adopted_from": summary["adopted_from"]})
        write_metrics(out / "metrics.jsonl", [])  # no epochs: nothing was trained
        atomic_write_json(out / "summary.json", summary)
        log.info("teacher: adopted %s (%s), not trained: test_acc %.4f, test_loss %.4f", source,
                 summary["model"]["name"], test_acc, test_loss)
    return summary


def train_stage(cfg: Config, env: DistEnv, data: PreparedData, stage: str) -> dict[str, Any]:
    """Train one of the three models; resumes from its checkpoint, skips if already done.
    A teacher given as `model.teacher_checkpoint` is adopted instead (adopt_teacher)."""
    assert stage in STAGES, stage
    if stage == "teacher" and cfg.model.teacher_checkpoint:
        return adopt_teacher(cfg, env, data)
    dtype = amp_dtype(cfg, env.device)
    teacher: TeacherLogits | None = None
    record: TeacherRecord | None = None
    if stage == "student-kd":
        teacher, record = teacher_logits_source(cfg, data, env, dtype)
    fp = stage_fingerprint(cfg, stage, data, precision_name(dtype), record)
    accepted = accepted_fingerprints(fp, cfg.optim.student_lr, record is not None and record.legacy_ok)
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
