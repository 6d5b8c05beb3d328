"""Ensembles of teachers (`kd.ensemble=N`, N >= 2): who the members are, their logits, and
how they are combined.

Members. Member 1 is the run's own teacher (`teacher/`). Members 2..N (`teacher-2/` ...)
are stages of their own (kd_ddp.stages.teacher_member), each trained, fingerprinted and
resumed like the teacher under a *member config*: the run's config with a seed of its own
(`member_seed`: another initialization, sample order and augmentation) and, where
`kd.ensemble_members` says so, another model form, or adopted from a file
(`model.teacher_checkpoint` of the member config: the adoption rules of kd_ddp.teachers,
plus a refusal of a file that records other data or another class count).

Combination. The ensemble's soft target at temperature T is the mean of the members'
probabilities, p = mean_i softmax(z_i / T) (the ensemble of Hinton et al. 2015, section 2).
`losses.ensemble_logits` returns T * log p: logits whose softmax at T is p exactly, so the
seed's KD loss takes them unchanged. At T = 1 the same rule gives the ensemble's own
prediction (`evaluate_ensemble`).

Cache. Each member's logits are cached on their own (`teacher-logits/`, `teacher-logits-2/`
...: the cache of one teacher, keyed by that member's record and the student's views), so
a member added later, or a sweep over temperature and alpha, rebuilds nothing. The KD
student combines them once, when it loads them, into one float32 table of the ensemble's
logits for the run's temperature: a step then costs the same whatever N. Bytes: on disk N x
views x samples x classes x bytes(kd.cache_dtype) (CIFAR-10, fp16: 1 MB per member per view);
in memory the combined table, views x samples x classes x 4 (2 MB per view).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_ddp import losses, stages
from kd_ddp.augment import normalize, to_device
from kd_ddp.checkpoint import CheckpointError, load_checkpoint
from kd_ddp.config import Config, ConfigError, from_dict, member_form
from kd_ddp.data import EvalLoader, PreparedData
from kd_ddp.distributed import DistEnv, all_reduce_tensor
from kd_ddp.fingerprints import ENSEMBLE_RULE
from kd_ddp.precision import autocast
from kd_ddp.teacher_logits import LogitsCache, TeacherRecord, cache_lock
from kd_ddp.teachers import load_trained_teacher

log = logging.getLogger(__name__)

RULE = ENSEMBLE_RULE  # the combination rule, as fingerprints and summaries record it
# the teacher model fields a member adopted with @PATH takes from the config its checkpoint records
TEACHER_MODEL_FIELDS = ("teacher", "teacher_width", "teacher_hidden", "dropout", "teacher_kwargs", "cifar_stem",
                        "python_path")


def size(cfg: Config) -> int:
    """The number of teachers: kd.ensemble, or 1 without an ensemble."""
    return cfg.kd.ensemble if cfg.kd.ensemble >= 2 else 1


def member_seed(seed: int, member: int) -> int:
    """Member `member`'s seed: the run's for member 1, else a hash of (seed, member), so that
    the members of seed 0's ensemble are not those of seed 1's (as seed + i would make them)."""
    if member == 1:
        return seed
    return int.from_bytes(hashlib.sha256(f"kd-ddp/teacher/{seed}/{member}".encode()).digest()[:8], "little") >> 1


def member_entry(cfg: Config, member: int) -> str:
    """kd.ensemble_members' entry for `member` (>= 2): "" when the list is empty."""
    return cfg.kd.ensemble_members[member - 2] if cfg.kd.ensemble_members else ""


def member_config(cfg: Config, member: int) -> Config:
    """The config member `member` is trained, adopted, loaded and fingerprinted with (the run's
    own for member 1). CheckpointError for an adopted file that is missing or, given as @PATH,
    records no architecture."""
    if member == 1:
        return cfg
    if not 2 <= member <= size(cfg):
        raise ConfigError(f"no teacher {member} in an ensemble of {size(cfg)} (kd.ensemble={cfg.kd.ensemble})")
    form, path = member_form(member_entry(cfg, member))
    mcfg = copy.deepcopy(cfg)
    mcfg.seed = member_seed(cfg.seed, member)
    mcfg.model.teacher_checkpoint = ""
    if form and form != cfg.model.teacher:
        mcfg.model.teacher, mcfg.model.teacher_kwargs = form, ""  # the kwargs are model.teacher's
    if path:
        source, recorded = adopted_source(Path(path), member, needs_record=not form)
        if recorded is not None and not form:
            for name in TEACHER_MODEL_FIELDS:
                setattr(mcfg.model, name, copy.deepcopy(getattr(recorded.model, name)))
        mcfg.model.teacher_checkpoint = str(source)
    return mcfg


def adopted_source(path: Path, member: int, needs_record: bool) -> tuple[Path, Config | None]:
    """The file member `member` is adopted from (a run dir stands for its teacher's checkpoint)
    and the config that file records (None: a plain state_dict, which records none)."""
    where = f"kd.ensemble_members: member {member} ({path})"
    if path.is_dir():
        if not (path / stages.TEACHER.name / "summary.json").is_file():
            raise CheckpointError(f"{where}: holds no finished teacher ({path / stages.TEACHER.name}/summary.json)")
        path = path / stages.TEACHER.name / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    state = load_checkpoint(path)
    recorded = state.get("config") if isinstance(state, dict) else None
    if isinstance(recorded, dict):
        return path, from_dict(recorded)
    if needs_record:
        raise CheckpointError(f"{where} records no architecture (a plain state_dict): write it as FORM@PATH, "
                              "FORM the model form it was made as (teacher_cnn, torchvision:resnet18, ...)")
    return path, None


def refuse_other_data(cfg: Config, member: int, data: PreparedData) -> None:
    """CheckpointError when an adopted member's file records other training data or another
    class count than this run's (a plain state_dict records neither: its shapes are checked
    when it loads)."""
    source = cfg.model.teacher_checkpoint
    if member < 2 or not source:
        return
    state = load_checkpoint(Path(source))
    fields = state.get("fingerprint_fields") if isinstance(state.get("fingerprint_fields"), dict) else {}
    classes = state.get("num_classes")
    where = f"kd.ensemble_members: member {member} ({source})"
    if isinstance(classes, int) and classes != data.num_classes:
        raise CheckpointError(f"{where} was trained for {classes} classes, this run's data has {data.num_classes}")
    if fields.get("data") not in (None, data.content_hash):
        raise CheckpointError(f"{where} was trained on other data (content hash {fields['data']}, this run's is "
                              f"{data.content_hash}): an ensemble's members must be trained on the student's data")


def load_members(cfg: Config, data: PreparedData, env: DistEnv) -> tuple[list[nn.Module], list[TeacherRecord]]:
    """Every member's trained model (eval mode) and record, in member order."""
    models, records = [], []
    for stage in stages.teachers(size(cfg)):
        model, record = load_trained_teacher(member_config(cfg, stage.member), data, env, stage.name)
        models.append(model)
        records.append(record)
    return models, records


def cached_ensemble_table(cfg: Config, data: PreparedData, env: DistEnv, records: list[TeacherRecord]
                          ) -> torch.Tensor:
    """The ensemble's logits for the run's temperature, [views, samples, classes] float32 on
    the device, combined from the members' caches (each checked and checksummed under its lock)."""
    tables = []
    for member, record in enumerate(records, start=1):
        with cache_lock(cfg, env, member):
            tables.append(LogitsCache(cfg, data, record, env.device, member).table)
    views = tables[0].shape[0]
    return torch.stack([losses.ensemble_logits(torch.stack([t[v].float() for t in tables]), cfg.kd.temperature)
                        for v in range(views)])


def live_ensemble(models: list[nn.Module], temperature: float, device: torch.device,
                  dtype: torch.dtype | None) -> Any:
    """(x, indices, view) -> the ensemble's logits on the student's input, every member a forward."""

    @torch.no_grad()
    def logits(x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        with autocast(device, dtype):
            members = torch.stack([m(x).float() for m in models])
        return losses.ensemble_logits(members, temperature)

    return logits


def ensemble_source(cfg: Config, data: PreparedData, env: DistEnv, dtype: torch.dtype | None
                    ) -> tuple[Any, list[TeacherRecord], list[nn.Module]]:
    """The ensemble KD student's teacher logits for a batch (from the members' caches combined
    once, or every member live), the members' records and models."""
    models, records = load_members(cfg, data, env)
    if cfg.kd.teacher == "live":
        return live_ensemble(models, cfg.kd.temperature, env.device, dtype), records, models
    table = cached_ensemble_table(cfg, data, env, records)
    views = table.shape[0]
    return (lambda x, idx, view: table[view % views, to_device(idx, table.device)]), records, models


@torch.no_grad()
def evaluate_ensemble(models: list[nn.Module], cfg: Config, data: PreparedData, env: DistEnv,
                      dtype: torch.dtype | None) -> tuple[float, float]:
    """(CE loss, accuracy) on the test split of the ensemble's prediction: the mean of the
    members' probabilities (RULE at T = 1)."""
    mean, std = data.stats(env.device)
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
    for images, labels, _ in EvalLoader(cfg, data, env):
        x = normalize(images, mean, std, cfg.train.channels_last)
        with autocast(env.device, dtype):
            members = torch.stack([m(x).float() for m in models])
        logits = losses.ensemble_logits(members, 1.0)
        sums[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
    loss_sum, correct, total = all_reduce_tensor(sums, env).tolist()  # host sync: once
    return loss_sum / total, correct / total


def ensemble_facts(cfg: Config, data: PreparedData, env: DistEnv, models: list[nn.Module],
                   records: list[TeacherRecord], dtype: torch.dtype | None) -> dict[str, Any]:
    """What the ensemble KD student's summary records of its teachers: the rule, each member's
    stage, architecture, weights and test accuracy (from its summary), and the ensemble's."""
    loss, acc = evaluate_ensemble(models, cfg, data, env, dtype)
    members = []
    for stage, record in zip(stages.teachers(size(cfg)), records, strict=True):
        mcfg = member_config(cfg, stage.member)
        summary_path = cfg.run_dir / stage.name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        members.append({"stage": stage.name, "seed": mcfg.seed, "model": record.model, "weights": record.weights,
                        "test_acc": summary.get("test_acc"), "adopted_from": summary.get("adopted_from")})
    return {"size": len(models), "rule": RULE, "test_acc": acc, "test_loss": loss, "members": members}
