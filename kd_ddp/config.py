"""Every knob of the pipeline, in one typed tree of dataclasses.

The same `Config` object drives the CLI, torchrun, the Slurm launchers and the tests:
build it with `load_config(preset, overrides)` where each override is `section.field=value`
(`seed=1`, `kd.alpha=0.3`, `tracking.wandb.mode=disabled`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import io
import json
import math
import os
import shlex
import textwrap
import tokenize
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_ddp.stages import ROLES, TEACHER_ROLE, TRAINED


def _a(noun: str) -> str:
    """'an int', 'a float': the article a type's name takes in a message."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _is_teacher(role: str) -> bool:
    """A role's name checked: a stage name passed by mistake (`student-kd`) fails loudly."""
    if role not in ROLES:
        raise ValueError(f"{role!r} is not a role; roles: {', '.join(ROLES)}")
    return role == TEACHER_ROLE


class ConfigError(ValueError):
    """A user error in the configuration: printed as a message, never as a traceback."""


@dataclass
class DataConfig:
    # synthetic | imagefolder | cifar-batches | archive (a .tar.gz of an ImageFolder tree)
    source: str = "archive"
    # Path of the source: ImageFolder dir, dir holding cifar-10-batches-py, or the archive.
    root: str = "../shared/data/cifar10-jpeg.tar.gz"
    # Where prepared data (.npy arrays, .beton files) is kept; "" = $KD_DDP_CACHE or
    # ~/.cache/kd-ddp. Must be on a shared filesystem for multi-node runs.
    cache_dir: str = ""
    image_size: int = 32
    # auto | ffcv | torch (arrays in host memory, no FFCV needed) | device (arrays held on the
    # training device, no copy per step). auto: device on a GPU when the data fits, else ffcv
    # when installed, else torch (kd_ddp/data.py resolve_loader).
    loader: str = "auto"
    num_workers: int = 0  # FFCV decode threads; 0 = the cores this rank owns
    crop_padding: int = 4  # random-crop padding in pixels (0 = no crop)
    flip: bool = True
    skip_bad_images: bool = False  # skip unreadable image files (counted in the log) instead of stopping
    # Synthetic source only: learnable class templates plus noise, made on the fly.
    synthetic_train: int = 1024
    synthetic_test: int = 512
    synthetic_classes: int = 10


@dataclass
class ModelConfig:
    # A seed CNN (teacher_cnn | teacher_cnn_lite | student_cnn), torchvision:<name> (any torchvision
    # classification builder, random initial weights) or <module.path>:<callable> (your own code,
    # called with num_classes and the kwargs below): README, "Your own models"
    teacher: str = "teacher_cnn"
    student: str = "student_cnn"
    teacher_width: int = 32  # seed CNNs: channels of the first block; doubled per block
    student_width: int = 16
    teacher_hidden: int = 256  # seed CNNs: hidden units of the classifier head
    student_hidden: int = 256
    dropout: float = 0.25  # seed CNNs: dropout before the last layer
    # torchvision and your own models: more keyword arguments, a JSON object ('{"dropout": 0.1}')
    teacher_kwargs: str = ""
    student_kwargs: str = ""
    # torchvision models: 3x3 stride-1 first conv and no max-pool after it (true | false | auto:
    # on when data.image_size <= 64)
    cifar_stem: str = "auto"
    # Directories that hold a <module.path> model, in every rank and Slurm job: its top-level module is looked
    # up there first; they are added at the end of sys.path, never shadowing a package kd-ddp imports
    python_path: list[str] = field(default_factory=list)
    # A teacher trained elsewhere (a state_dict file or a kd-ddp checkpoint): train-teacher evaluates
    # it instead of training one
    teacher_checkpoint: str = ""


@dataclass
class OptimConfig:
    epochs: int = 20  # every training stage, unless a stage-specific value is > 0
    teacher_epochs: int = 0
    student_epochs: int = 0
    batch_size: int = 256  # global: split evenly across ranks
    lr: float = 0.1  # peak learning rate after warm-up
    student_lr: float = 0.0  # 0 = use lr
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    student_warmup_epochs: float = -1.0  # < 0 = use warmup_epochs
    label_smoothing: float = 0.0


@dataclass
class KDConfig:
    alpha: float = 0.5  # weight of hard-label CE; (1 - alpha) goes to the KL term
    temperature: float = 4.0
    teacher: str = "cached"  # cached (logits read from disk) | live (teacher forward per step)
    views: int = 8  # augmented views cached per training image; epoch e uses view e % views
    cache_dtype: str = "float16"  # float16 | bfloat16 | float32
    # The "normal" student regresses one-hot targets with MSE. `logits` follows the seed
    # notebook (MSE on raw outputs); `softmax` is the Brier score.
    mse_input: str = "logits"
    # Distill an ensemble too: 0 = off (one teacher); N >= 2 = N teachers (teacher/ and teacher-2/ ...
    # teacher-N/, each a stage of its own), every member's logits cached, and a third student,
    # student-kd-ensemble, trained on the ensemble's soft targets: the mean of the members'
    # probabilities at kd.temperature (README, "Ensembles").
    ensemble: int = 0
    # Members 2..N, one entry each (empty: all like model.teacher, each with a seed of its own).
    # An entry is a model form (trained here with its own seed: teacher_cnn_lite, torchvision:resnet18,
    # pkg.mod:fn), @PATH (adopted: a kd-ddp run dir's teacher, or a kd-ddp checkpoint; both record
    # their architecture) or FORM@PATH (adopted: a plain state_dict file made as FORM).
    ensemble_members: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16) | bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on this node
    eval_batch_size: int = 1024
    # Steps whose loss is NaN/inf are skipped (no update) up to this many per stage; 0 = stop at the first.
    nonfinite_skip_limit: int = 0
    # The host reads the step flags (non-finite losses, SIGTERM) every this many steps; the
    # steps between never wait for the device. 0 = auto: 1 on a CPU (a read costs nothing
    # there), 50 on a GPU. A SIGTERM stops the run at the next such read.
    check_every: int = 0
    # BatchNorm statistics over the global batch instead of each rank's share (SyncBatchNorm;
    # for small per-rank batches). CUDA only: torch's SyncBatchNorm does not run on CPUs.
    sync_bn: bool = False
    # One rank trains without a process group or DDP wrapper, however it was started (plain,
    # or `torchrun --nproc_per_node=1`): nothing to all-reduce, so no collective and no DDP
    # hook in a step. true keeps DDP over a group of one under torchrun (a one-GPU test of
    # the NCCL + DDP path that several GPUs take). The weights are the same either way.
    one_rank_ddp: bool = False
    # The training step captured once as a CUDA graph and replayed (kd_ddp/graphed_step.py):
    # auto = where the capture applies (a GPU, one rank, no fp16 GradScaler, data.loader
    # device), on = try it anywhere, off = eager steps. A capture that fails falls back to
    # eager steps with a warning naming the reason. The weights are those of the eager step.
    cuda_graph: str = "auto"  # auto | on | off


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    entity: str = ""
    project: str = "kd-ddp"
    group: str = ""  # "" = derived from the run dir
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    progress: bool = True  # progress bar on rank 0 (only when stderr is a TTY)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class StageResources:
    """What one Slurm job of a stage asks for (launch/slurm.py turns it into sbatch flags)."""

    nodes: int = 1
    tasks_per_node: int = 1  # > 1 (or nodes > 1): one torch.distributed rank per task
    # GPUs as Slurm takes them, a count or TYPE:COUNT ("4", "a100:4"); "" or "0" = none. Of the
    # three GPU fields the job uses one: gres if set, else gpus_per_task if set, else gpus_per_node.
    # --gpus-per-node: every task of a node sees all the node's GPUs (NCCL peer-to-peer works).
    gpus_per_node: str = ""
    gpus_per_task: str = ""  # --gpus-per-task: each task sees only its own GPUs
    gres: str = ""  # --gres, for sites that take GPUs only that way: "gpu:a100:4"
    gpu_bind: str = ""  # --gpu-bind ("none", "closest", ...); "" = the site's default
    # CPUs of each task (rank): srun binds the task to them, torch uses as many threads.
    cpus_per_task: int = 8
    mem_gb: float = 0  # per node; 0 = the partition's default
    time_min: int = 60
    partition: str = ""  # "" = the cluster's default
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # More sbatch options, written as on the sbatch command line (values may hold commas):
    # "--exclusive --mail-type=END,FAIL --nodelist=n[1,3]"
    extra: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def gpu_request(self) -> tuple[str, str] | None:
        """The one GPU option the job gets, as (sbatch option, value), or None for no GPU."""
        for name in ("gres", "gpus_per_task", "gpus_per_node"):
            value = str(getattr(self, name)).strip()
            if value not in ("", "0"):
                return name.replace("_", "-"), value
        return None

    def gpus_on_node(self) -> int:
        """GPUs the job asks for on each node (0 = none)."""
        request = self.gpu_request()
        if request is None:
            return 0
        option, value = request
        if option == "gres":
            return gres_gpu_count(value) or 0
        return (gpu_count(value) or 0) * (self.tasks_per_node if option == "gpus-per-task" else 1)

    def extra_options(self) -> dict[str, str | bool]:
        """`extra` as {option: value, flag: True}; ValueError naming what does not parse."""
        return command_line_options(self.extra)


def gpu_count(spec: str | int) -> int | None:
    """The count in a Slurm GPU request ("4" or "a100:4" -> 4, "" -> 0); None when malformed."""
    text = str(spec).strip()
    if not text:
        return 0
    kind, _, count = text.rpartition(":")
    if not count.isdigit() or (kind and not kind.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        return None
    return int(count)


def gres_gpu_count(gres: str) -> int | None:
    """GPUs in a --gres value ("gpu:a100:2,nvme:1" -> 2; a gpu entry without a count is 1); None when malformed."""
    total = 0
    for item in (i.strip() for i in gres.split(",") if i.strip()):
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) > 3 or not all(parts):
            return None
        count = parts[-1] if len(parts) > 1 and parts[-1].isdigit() else "1"
        if len(parts) == 3 and not parts[2].isdigit():
            return None
        total += int(count)
    return total


def command_line_options(text: str) -> dict[str, str | bool]:
    """"--exclusive --mail-type=END,FAIL" -> {"exclusive": True, "mail-type": "END,FAIL"} (shell quoting)."""
    options: dict[str, str | bool] = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not key.startswith("-") or not key.lstrip("-"):
            raise ValueError(f"{token!r} is not an option: write --key=value or --flag, separated by spaces")
        options[key.lstrip("-")] = value if sep else True
    return options


def _gpu_stage(time_min: int) -> StageResources:
    return StageResources(gpus_per_node="1", cpus_per_task=8, mem_gb=32, time_min=time_min)


@dataclass
class SlurmConfig:
    """Per-stage resources of the Slurm launchers (launch/slurm.py), with defaults for a GPU cluster."""

    log_dir: str = ""  # submitit folders and logs; "" = <run.dir>/slurm
    # USR2 comes this long before the time limit; submitit requeues the job (NCCL owns USR1).
    signal_delay_s: int = 120
    max_timeouts: int = 3  # times a job that hits its time limit is requeued to resume
    array_parallelism: int = 64  # sweep students running at once
    # Shell lines every job runs before it starts its tasks: "module load cuda/12.4; source /shared/kd/bin/activate"
    setup: str = ""
    # Environment of every task, NAME=VALUE separated by spaces: "NCCL_SOCKET_IFNAME=ib0 NCCL_DEBUG=WARN"
    env: str = ""
    srun_args: str = ""  # more srun options for the tasks, as on the srun command line: "--cpu-bind=cores"
    # The command that runs Python in the tasks; "" = the launcher's own interpreter.
    # A wrapper works: "apptainer exec --nv /shared/kd.sif python"
    python: str = ""
    wckey: str = ""  # --wckey; "" = none (sites that enforce wckeys refuse submitit's own "submitit")
    prepare_data: StageResources = field(default_factory=lambda: StageResources(mem_gb=16, time_min=60))
    teacher: StageResources = field(default_factory=lambda: _gpu_stage(240))
    cache_logits: StageResources = field(default_factory=lambda: _gpu_stage(60))
    student: StageResources = field(default_factory=lambda: _gpu_stage(180))  # both students, sweeps
    report: StageResources = field(default_factory=lambda: StageResources(cpus_per_task=1, mem_gb=4, time_min=15))

    def stages(self) -> dict[str, StageResources]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), StageResources)}

    def env_vars(self) -> dict[str, str]:
        """`env` as {NAME: VALUE}; ValueError naming an item that is not NAME=VALUE."""
        out: dict[str, str] = {}
        for token in shlex.split(self.env):
            name, sep, value = token.partition("=")
            if not sep or not name.isidentifier():
                raise ValueError(f"{token!r} is not NAME=VALUE")
            out[name] = value
        return out


@dataclass
class Config:
    preset: str = "seed"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    # -- derived values -------------------------------------------------------------
    # Per role (stages.ROLES: the teacher's fields, or the students' shared ones), each falling
    # back to the common optim field when its own is unset.
    def epochs_for(self, role: str) -> int:
        specific = self.optim.teacher_epochs if _is_teacher(role) else self.optim.student_epochs
        return specific if specific > 0 else self.optim.epochs

    def warmup_for(self, role: str) -> float:
        if not _is_teacher(role) and self.optim.student_warmup_epochs >= 0:
            return self.optim.student_warmup_epochs
        return self.optim.warmup_epochs

    def lr_for(self, role: str) -> float:
        if not _is_teacher(role) and self.optim.student_lr > 0:
            return self.optim.student_lr
        return self.optim.lr

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def cache_dir(self) -> Path:
        if self.data.cache_dir:
            return Path(self.data.cache_dir)
        return Path(os.environ.get("KD_DDP_CACHE", Path.home() / ".cache" / "kd-ddp"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- presets --------------------------------------------------------------------------


def _preset_seed(cfg: Config) -> None:
    """The seed notebook's recipe on full CIFAR-10: the dataclasses' defaults, 20 teacher epochs.

    Sized for a CPU: the teacher (6 conv layers of 32-64-128 channels, ~39 M multiply-adds
    per image) trains at ~380 img/s on one core of the dev machine, 20 epochs in ~45 min.
    15 epochs gave 0.8495 there, just short of the 0.85 the results aim for (results/).
    Students: 20 epochs of ~15 s each on that machine."""
    cfg.optim.teacher_epochs = 20


def _preset_seed_gpu(cfg: Config) -> None:
    """The seed recipe at a GPU's pace: the same models, data and schedule shape.

    At the seed's batch of 256 a step of these small CNNs is launch-bound on an H100
    (~54k img/s for the teacher, against 190k+ at 1024: BENCHMARKS.md), so the global batch
    is 1024. Validated on the CPU at that batch (BENCHMARKS.md, "seed-gpu recipe"): the
    teacher's peak LR scales linearly (0.1 x 4), its warm-up stays one epoch, and with a
    quarter of the steps it trains 30 epochs instead of 20 (0.861, against 0.842 after 20);
    the students' LR scales with the square root (0.1 x 2) after a 3-epoch warm-up (normal
    0.673, KD 0.747): with one epoch the KD loss rose after the warm-up and KD ended below
    the normal student, at 0.1 the normal (MSE) student fell to 0.61, at 0.4 KD diverged.
    The logits cache holds one view per student epoch (20 views of CIFAR-10: 20 MB), so the
    cached KD student sees a fresh view every epoch, like the live teacher. The data loader
    is `auto`: device-resident on the GPU. The `seed` preset stays the CPU recipe (its
    results in results/ were made at batch 256)."""
    _preset_seed(cfg)
    cfg.optim.batch_size = 1024
    cfg.optim.lr = 0.4
    cfg.optim.teacher_epochs = 30
    cfg.optim.student_lr = 0.2
    cfg.optim.student_warmup_epochs = 3.0
    cfg.kd.views = 20


def _preset_quick(cfg: Config) -> None:
    """Real CIFAR-10, the whole pipeline in <= 15 minutes on a 2-core CPU."""
    # Measured on the 2-core AVX2 dev machine: ~60 s per teacher epoch, 69% after 3.
    cfg.model.teacher = "teacher_cnn_lite"
    cfg.model.teacher_width = 32
    cfg.model.teacher_hidden = 256
    cfg.optim.teacher_epochs = 5
    cfg.optim.student_epochs = 4
    cfg.optim.batch_size = 256
    cfg.optim.lr = 0.2
    cfg.optim.warmup_epochs = 0.5
    cfg.kd.views = 4


def _preset_smoke(cfg: Config) -> None:
    """Tiny synthetic data and models: the whole pipeline in seconds (tests)."""
    cfg.data.source = "synthetic"
    cfg.data.root = ""
    cfg.data.synthetic_train = 512
    cfg.data.synthetic_test = 256
    cfg.model.teacher_width = 8
    cfg.model.teacher_hidden = 32
    cfg.model.student_width = 4
    cfg.model.student_hidden = 16
    cfg.optim.epochs = 2
    cfg.optim.batch_size = 64
    cfg.optim.lr = 0.05
    cfg.optim.warmup_epochs = 0.5
    cfg.kd.views = 2
    cfg.train.eval_batch_size = 128
    for res in cfg.slurm.stages().values():  # the CPU-only dev cluster of the tests
        res.gpus_per_node = res.gpus_per_task = res.gres = ""
        res.cpus_per_task, res.mem_gb, res.time_min = 1, 1, 30


def _preset_strong(cfg: Config) -> None:
    """A strong teacher for one GPU: torchvision's ResNet-18 with the CIFAR stem (11.2 M
    parameters, 0.56 G multiply-adds per image, 14x the seed teacher) distilled into the
    seed's student_cnn, beside the same student trained the normal way.

    The recipe is the common one for ResNet-18 on CIFAR-10 (SGD, Nesterov momentum 0.9,
    weight decay 5e-4, crop + flip, cosine schedule), shortened to 40 teacher epochs at a
    global batch of 512 with the peak LR scaled linearly from 0.1 per 128 images (0.4) after
    2 warm-up epochs; no label smoothing, which makes a teacher's soft targets less useful
    for distillation. The students keep seed-gpu's rule, 0.1 x sqrt(batch / 256) (0.14 at
    512), for 30 epochs, the logits cache holding one view per student epoch. Not yet run on a GPU: the
    CPU measurement of one teacher epoch and the projection are in BENCHMARKS.md."""
    cfg.model.teacher = "torchvision:resnet18"
    cfg.model.cifar_stem = "auto"
    cfg.optim.batch_size = 512
    cfg.optim.lr = 0.4
    cfg.optim.student_lr = 0.14
    cfg.optim.warmup_epochs = 2.0
    cfg.optim.teacher_epochs = 40
    cfg.optim.student_epochs = 30
    cfg.kd.views = 30


PRESETS: dict[str, typing.Callable[[Config], None]] = {
    "seed": _preset_seed,
    "seed-gpu": _preset_seed_gpu,
    "strong": _preset_strong,
    "quick": _preset_quick,
    "smoke": _preset_smoke,
}

# The seed's CNNs (kd_ddp/models.py); model.teacher / model.student may also name a
# torchvision model or a user's callable (model_kind).
SEED_MODELS = ("teacher_cnn", "teacher_cnn_lite", "student_cnn")


def model_kind(name: str) -> str:
    """"seed", "torchvision" (`torchvision:<name>`) or "import" (`<module.path>:<callable>`);
    ConfigError for a name of none of these forms (whether it exists is models.py's to say)."""
    if name in SEED_MODELS:
        return "seed"
    module, sep, attr = name.partition(":")
    if sep and attr.isidentifier() and all(part.isidentifier() for part in module.split(".")):
        return "torchvision" if module == "torchvision" else "import"
    close = difflib.get_close_matches(name, SEED_MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if not sep and name.isidentifier() and not close:
        hint = f" (a torchvision model is written torchvision:{name})"
    raise ConfigError(f"unknown model {name!r}{hint}: give one of {', '.join(SEED_MODELS)}, torchvision:<name> "
                      "or <module.path>:<callable>")


def _model_problems(cfg: Config) -> list[str]:
    m = cfg.model
    problems = [f"model.{name}={getattr(m, name)}: must be >= 1"
                for name in ("teacher_width", "student_width", "teacher_hidden", "student_hidden")
                if getattr(m, name) < 1]
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout={m.dropout}: must be in [0, 1)")
    for role in ROLES:
        try:
            kind = model_kind(getattr(m, role))
        except ConfigError as e:
            problems.append(f"model.{role}: {e}")
            continue
        problems += _kwargs_problems(f"model.{role}_kwargs", getattr(m, f"{role}_kwargs"), kind)
    return problems


def _kwargs_problems(key: str, text: str, kind: str) -> list[str]:
    if not text.strip():
        return []
    if kind == "seed":
        return [f"{key}: the seed CNNs take no keyword arguments (their sizes are model.*_width and *_hidden)"]
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"{key}={text!r}: not JSON ({e.msg}); write an object: '{{\"name\": value}}'"]
    if not isinstance(kwargs, dict):
        return [f"{key}={text!r}: must be a JSON object ({{\"name\": value, ...}}), not a {type(kwargs).__name__}"]
    reserved = [k for k in ("num_classes", "weights") if k in kwargs]
    return [f"{key}: {k!r} is set by kd-ddp (num_classes from the data; weights: random, never downloaded)"
            for k in reserved]


# Allowed values of the string-valued choice fields.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "imagefolder", "cifar-batches", "archive"),
    "data.loader": ("auto", "ffcv", "torch", "device"),
    "model.cifar_stem": ("auto", "true", "false"),
    "kd.teacher": ("cached", "live"),
    "kd.cache_dtype": ("float16", "bfloat16", "float32"),
    "kd.mse_input": ("logits", "softmax"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.cuda_graph": ("auto", "on", "off"),
    "tracking.wandb.mode": ("offline", "online", "disabled"),
}


# -- overrides ------------------------------------------------------------------------


def _leaf_fields(obj: Any, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Map 'a.b.c' -> (owner object, attribute name, declared type) for every leaf."""
    out: dict[str, tuple[Any, str, Any]] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(_leaf_fields(value, key + "."))
        else:
            out[key] = (obj, f.name, hints[f.name])
    return out


def _parse_value(key: str, text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is list or origin is types.GenericAlias:
        (item,) = typing.get_args(typ)
        parts = [p for p in text.split(",") if p != ""]
        return [_parse_value(key, p, item) for p in parts]
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {_a(typ.__name__)}") from None
    return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    leaves = _leaf_fields(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        if key not in leaves:
            close = difflib.get_close_matches(key, leaves.keys(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        owner, name, typ = leaves[key]
        setattr(owner, name, _parse_value(key, text.strip(), typ))
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (checkpoints, manifests, Slurm jobs)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            typ = hints[f.name]
            v = values[f.name]
            kwargs[f.name] = build(typ, v) if dataclasses.is_dataclass(typ) else v
        return cls(**kwargs)

    return build(Config, data)


def load_config(preset: str | None = None, overrides: list[str] | None = None,
                config_file: str | Path | None = None) -> Config:
    """The dataclass defaults, then the preset, then `config_file`, then `overrides`.

    The preset is `preset`, else the `preset` named in the file, else quick; a file made
    with another preset than the one asked for is refused. The file (JSON or YAML, as
    `kd-ddp config` prints it or a run dir's `config.<stage>.json`) may name any subset of
    the fields."""
    values = read_config_file(config_file) if config_file is not None else {}
    cfg = Config(preset=_choose_preset(preset, values.get("preset"), config_file))
    PRESETS[cfg.preset](cfg)
    if values:
        apply_file_values(cfg, values, str(config_file))
    overrides = overrides or []
    _reset_stage_epochs(cfg, {o.partition("=")[0].strip().lstrip("-") for o in overrides})
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _choose_preset(asked: str | None, in_file: Any, config_file: str | Path | None) -> str:
    if asked and in_file and asked != in_file:
        raise ConfigError(f"preset {asked!r} was asked for but {config_file} was made with preset {in_file!r}: "
                          "drop --preset (the file's preset is used) or the file's preset key")
    name = asked or in_file or "quick"
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS.keys(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return name


def _reset_stage_epochs(cfg: Config, keys: typing.Iterable[str]) -> None:
    if "optim.epochs" in keys:
        # `optim.epochs=N` (on the command line or in a file) sets every stage, beating the
        # stage-specific values below it; a stage-specific value given beside it still wins.
        cfg.optim.teacher_epochs = cfg.optim.student_epochs = 0


# Float fields that may hold nan or inf; every other float field must be a finite number.
NONFINITE_ALLOWED: frozenset[str] = frozenset()
# torch.manual_seed and numpy's generators take seeds in [0, 2**64).
SEED_LIMIT = 2**64
# Text fields that launch/slurm.py writes into the batch script (#SBATCH values, the srun
# line, exports) or its paths (the log dir, by default under run.dir): a newline there would
# start a script line of its own. slurm.setup is shell lines on purpose.
SCRIPT_TEXT_EXEMPT = frozenset({"slurm.setup"})


def _number_problems(leaves: dict[str, tuple[Any, str, Any]]) -> list[str]:
    """nan or inf in a float field: refused before any range check, which nan passes unseen
    (every comparison with it is false) and inf ends in an OverflowError deep inside training."""
    return [f"{key}={getattr(owner, name)}: must be a finite number"
            for key, (owner, name, typ) in leaves.items()
            if typ is float and key not in NONFINITE_ALLOWED and not math.isfinite(getattr(owner, name))]


def _control_characters(text: str) -> list[str]:
    """The control characters and line breaks in `text`, as escapes ("\\n", "\\x00")."""
    return sorted({repr(c)[1:-1] for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")})


def _script_text_problems(leaves: dict[str, tuple[Any, str, Any]]) -> list[str]:
    problems = []
    for key, (owner, name, typ) in leaves.items():
        if typ is str and (key.startswith("slurm.") or key == "run.dir") and key not in SCRIPT_TEXT_EXEMPT:
            bad = _control_characters(getattr(owner, name))
            if bad:
                problems.append(f"{key}={getattr(owner, name)!r}: holds control characters ({', '.join(bad)}): "
                                "it is written into the Slurm batch script, where a line break starts a new line")
    return problems


def validate(cfg: Config) -> None:
    leaves = _leaf_fields(cfg)
    problems = _number_problems(leaves)
    if problems:  # the range checks below say nothing sensible about nan and inf
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    for key, allowed in CHOICES.items():
        owner, name, _ = leaves[key]
        if getattr(owner, name) not in allowed:
            problems.append(f"{key}={getattr(owner, name)!r}: must be one of {', '.join(allowed)}")

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(0 <= cfg.seed < SEED_LIMIT, f"seed={cfg.seed}: must be in [0, 2**64 - 1] (the seeds torch and numpy take)")
    need(0.0 <= cfg.kd.alpha <= 1.0, f"kd.alpha={cfg.kd.alpha}: must be in [0, 1]")
    need(cfg.kd.temperature > 0, f"kd.temperature={cfg.kd.temperature}: must be > 0")
    need(cfg.kd.views >= 1, f"kd.views={cfg.kd.views}: must be >= 1")
    problems += _ensemble_problems(cfg)
    need(cfg.optim.epochs >= 1, f"optim.epochs={cfg.optim.epochs}: must be >= 1")
    for name in ("teacher_epochs", "student_epochs"):
        v = getattr(cfg.optim, name)
        need(v >= 0, f"optim.{name}={v}: must be >= 0 (0 = use optim.epochs)")
    need(cfg.optim.batch_size >= 1, f"optim.batch_size={cfg.optim.batch_size}: must be >= 1")
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0")
    need(cfg.optim.student_lr >= 0, f"optim.student_lr={cfg.optim.student_lr}: must be >= 0")
    need(0 <= cfg.optim.momentum < 1, f"optim.momentum={cfg.optim.momentum}: must be in [0, 1)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    need(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)")
    problems += _model_problems(cfg)
    need(cfg.data.image_size >= 8, f"data.image_size={cfg.data.image_size}: must be >= 8")
    need(cfg.data.crop_padding >= 0, "data.crop_padding must be >= 0")
    need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    need(cfg.data.synthetic_classes >= 2, "data.synthetic_classes must be >= 2")
    need(cfg.data.synthetic_train >= 1 and cfg.data.synthetic_test >= 1,
         "data.synthetic_train and data.synthetic_test must be >= 1")
    need(cfg.data.source == "synthetic" or bool(cfg.data.root),
         f"data.root is empty: data.source={cfg.data.source} needs a path")
    need(cfg.train.threads >= 0, "train.threads must be >= 0")
    need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
    need(cfg.train.nonfinite_skip_limit >= 0, "train.nonfinite_skip_limit must be >= 0")
    need(cfg.train.check_every >= 0, "train.check_every must be >= 0 (0 = auto)")
    need(bool(cfg.run.dir), "run.dir must not be empty")
    problems += _slurm_problems(cfg) + _script_text_problems(leaves)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def member_form(entry: str) -> tuple[str, str]:
    """A `kd.ensemble_members` entry as (model form, path): ("teacher_cnn_lite", "") trains,
    ("", "runs/a") adopts a kd-ddp run dir's teacher or checkpoint, ("torchvision:resnet18",
    "w.pt") adopts a plain state_dict file made as that form. The form is split at the first
    "@": a model form holds none."""
    form, sep, path = entry.partition("@")
    return form.strip(), path.strip() if sep else ""


def _ensemble_problems(cfg: Config) -> list[str]:
    n, members = cfg.kd.ensemble, cfg.kd.ensemble_members
    if n == 0 and not members:
        return []
    if n < 2:
        return [f"kd.ensemble={n}: an ensemble needs at least 2 teachers (kd.ensemble=N, N >= 2; 0 = one teacher, "
                "no ensemble)" + (f"; kd.ensemble_members lists {len(members)}" if members else "")]
    if members and len(members) != n - 1:
        return [f"kd.ensemble_members lists {len(members)} member(s), kd.ensemble={n} needs {n - 1}: one entry per "
                f"member 2..{n} (member 1 is the run's own teacher), or none (all like model.teacher)"]
    problems = []
    for i, entry in enumerate(members, start=2):
        form, path = member_form(entry)
        if "@" in entry and not path:
            problems.append(f"kd.ensemble_members: member {i} {entry!r}: no path after '@'")
        if not form and not path:
            problems.append(f"kd.ensemble_members: member {i} is empty: give a model form, @PATH or FORM@PATH")
        if form:
            try:
                model_kind(form)
            except ConfigError as e:
                problems.append(f"kd.ensemble_members: member {i}: {e}")
    return problems


def _slurm_problems(cfg: Config) -> list[str]:
    s = cfg.slurm
    problems = [f"slurm.{name}={getattr(s, name)}: must be >= {low}"
                for name, low in (("signal_delay_s", 0), ("max_timeouts", 0), ("array_parallelism", 1))
                if getattr(s, name) < low]
    for name, parse in (("env", s.env_vars), ("srun_args", lambda: shlex.split(s.srun_args)),
                        ("python", lambda: shlex.split(s.python))):
        try:
            parse()
        except ValueError as e:
            problems.append(f"slurm.{name}={getattr(s, name)!r}: {e}")
    for stage, res in s.stages().items():
        problems += _stage_problems(f"slurm.{stage}", res)
    for section in dict.fromkeys(stage.resources for stage in TRAINED):  # the jobs that train: teacher, student
        ranks = getattr(s, section).world_size
        if cfg.optim.batch_size % ranks:
            problems.append(f"optim.batch_size={cfg.optim.batch_size} is not divisible by the "
                            f"{ranks} ranks of slurm.{section} (nodes x tasks_per_node)")
    return problems


def _stage_problems(key: str, res: StageResources) -> list[str]:
    problems = [f"{key}.{name}={getattr(res, name)}: must be >= {low}"
                for name, low in (("nodes", 1), ("tasks_per_node", 1), ("cpus_per_task", 1), ("mem_gb", 0),
                                  ("time_min", 1))
                if getattr(res, name) < low]
    for name in ("gpus_per_node", "gpus_per_task"):
        if gpu_count(getattr(res, name)) is None:
            problems.append(f"{key}.{name}={getattr(res, name)!r}: expected a count or TYPE:COUNT (4, a100:4)")
    if gres_gpu_count(res.gres) is None or " " in res.gres.strip():
        problems.append(f"{key}.gres={res.gres!r}: expected NAME[:TYPE][:COUNT], comma-separated (gpu:a100:4)")
    per_node = res.gpus_on_node()
    if 0 < per_node < res.tasks_per_node:
        problems.append(f"{key}: {res.tasks_per_node} tasks per node but {per_node} GPU(s) per node: "
                        "each rank needs a GPU of its own")
    try:
        res.extra_options()
    except ValueError as e:
        problems.append(f"{key}.extra={res.extra!r}: {e}")
    return problems


def describe_differences(want: dict[str, Any], have: dict[str, Any], *, have_name: str = "it has",
                         want_name: str = "this run needs", prefix: str = "") -> list[str]:
    """One line per leaf where two nested dicts differ: `key: <have_name> X, <want_name> Y`."""
    diffs = []
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_differences(a, b, have_name=have_name, want_name=want_name, prefix=f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {have_name} {b!r}, {want_name} {a!r}")
    return diffs


def fingerprint(values: Any) -> str:
    """Stable short hash of JSON-able values (used to tell whether outputs still match)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- config files and field comments ----------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON (`.json`) or YAML (anything else; needs PyYAML) config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    values = _parse_json(p, text) if p.suffix.lower() == ".json" else _parse_yaml(p, text)
    if values is None:  # an empty YAML file, or one holding only comments
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections and fields, got {type(values).__name__}")
    return values


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
                          ) from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"config file {path}: reading YAML needs PyYAML (pip install pyyaml); "
                          "a .json file (kd-ddp config --format json) needs nothing") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def apply_file_values(cfg: Config, values: dict[str, Any], where: str) -> Config:
    """Set the fields named in `values` (nested sections, as `to_dict()` gives them); unknown
    keys and values of the wrong type are refused, naming `where` (the file)."""
    leaves = _leaf_fields(cfg)
    sections = {".".join(key.split(".")[:depth]) for key in leaves for depth in range(1, key.count(".") + 1)}
    given, unknown = _flatten(values, leaves, sections, where)
    if unknown:
        known = [*leaves, *sections]
        raise ConfigError(f"{where}: unknown config key(s) " + ", ".join(
            f"{k!r}" + (f" (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
            for k in unknown))
    _reset_stage_epochs(cfg, given)
    for key, value in given.items():
        owner, name, typ = leaves[key]
        setattr(owner, name, _coerce(f"{where}: {key}", value, typ))
    return cfg


def _flatten(values: dict[str, Any], leaves: dict[str, Any], sections: set[str], where: str,
             prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """({'a.b': value} for every known leaf in `values`, [unknown dotted keys])."""
    given: dict[str, Any] = {}
    unknown: list[str] = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if key in sections and isinstance(v, dict):
            sub, bad = _flatten(v, leaves, sections, where, key + ".")
            given |= sub
            unknown += bad
        elif key in sections:
            raise ConfigError(f"{where}: {key} is a section: expected a mapping of its fields, got {v!r}")
        elif key in leaves:
            given[key] = v
        else:
            unknown.append(key)
    return given, unknown


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """A value read from a file, checked against its field's type. A string is parsed as on
    the command line (YAML reads `1e-3` as a string), a number or bool in a string field
    becomes its command-line text (YAML reads `gpus_per_node: 4` as a number and
    `cifar_stem: true` as a bool); an int stays an int in a float field, so that a file
    reproduces the `to_dict()` it was written from."""
    if typing.get_origin(typ) is list and isinstance(value, list):
        (item,) = typing.get_args(typ)
        return [_coerce(key, v, item) for v in value]
    if isinstance(value, str):
        return _parse_value(key, value, typ)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if typ is str and number:
        return str(value)
    if typ is str and isinstance(value, bool):
        return "true" if value else "false"
    if (typ is float and number) or (typ in (int, bool) and type(value) is typ):
        return value
    raise ConfigError(f"{key}: expected {_a(str(getattr(typ, '__name__', typ)))}, got {value!r}")


@functools.cache
def _source_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment written beside that field in `cls`'s source: the comment-only
    lines directly above it and a comment at the end of its line(s), joined. {} when the source
    cannot be read (e.g. an installed .pyc only)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for stmt in next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        text = " ".join(c for c in above + beside if c)
        if text:
            out[stmt.target.id] = text
    return out


def field_comments(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """'section.field' -> its comment in this module's source, for every field and section of
    `cls` that has one (a section without a comment takes its class docstring's first line)."""
    out: dict[str, str] = {}
    own = _source_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, typ = prefix + f.name, hints[f.name]
        doc = (typ.__doc__ or "").strip() if dataclasses.is_dataclass(typ) else ""
        if f.name in own:
            out[key] = own[f.name]
        elif doc and not doc.startswith(f"{typ.__name__}("):  # not the signature dataclass makes up
            out[key] = doc.splitlines()[0]
        if dataclasses.is_dataclass(typ):
            out |= field_comments(typ, key + ".")
    return out


def config_yaml(cfg: Config, header: list[str] | None = None) -> str:
    """The config as YAML, each field under its comment from this module's source; PyYAML and
    `load_config(config_file=...)` read it back to the same Config."""
    lines = [f"# {h}" for h in header or []]
    return "\n".join(lines + _yaml_lines(cfg, field_comments(type(cfg)))) + "\n"


def _yaml_lines(obj: Any, comments: dict[str, str], prefix: str = "", depth: int = 0) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        lines += [f"{pad}# {part}" for part in textwrap.wrap(comments.get(key, ""), 100 - len(pad))]
        if dataclasses.is_dataclass(value):
            lines += [f"{pad}{f.name}:", *_yaml_lines(value, comments, key + ".", depth + 1)]
        else:
            lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}")
    return lines


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        text = repr(value)  # YAML 1.1 (PyYAML) takes `1e-05` for a string: needs `1.0e-05`
        return text if "." in text or "e" not in text else text.replace("e", ".0e", 1)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return _yaml_string(str(value))


def _yaml_string(text: str) -> str:
    """A double-quoted YAML scalar: JSON's escapes, plus \\u/\\U escapes for characters YAML
    does not take raw (C1 controls, line separators, ...)."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return '"' + "".join(c if c.isprintable() else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
                         for c in body) + '"'
