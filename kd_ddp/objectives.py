"""Each training stage's loss, chosen once: cross-entropy for the teacher, MSE against
one-hot labels for the normal student, the KD loss for the other, with the teacher's logits
for the very pixels the student is given (from the logits cache, or a live forward)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_ddp import losses, stages
from kd_ddp.config import Config
from kd_ddp.data import PreparedData
from kd_ddp.distributed import DistEnv
from kd_ddp.precision import autocast
from kd_ddp.teacher_logits import LogitsCache, TeacherRecord, cache_lock
from kd_ddp.teachers import load_trained_teacher

# (student logits, the student's input, labels, sample indices, view) -> scalar loss
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
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
        with autocast(env.device, dtype):
            return teacher(x).float()

    return live, record


def make_objective(cfg: Config, stage: str, teacher: TeacherLogits | None) -> Objective:
    """The stage's loss, chosen once: CE for the teacher, MSE on one-hot labels for the
    normal student, the KD loss (with the teacher's logits for the same view) for the KD
    students; the ensemble's student takes the ensemble's logits (kd_ddp.ensemble) as its
    teacher's, so its loss is the seed's formula on the ensemble's soft targets."""
    if stages.role_of(stage) == stages.TEACHER_ROLE:  # the teacher, or a member of its ensemble
        smoothing = cfg.optim.label_smoothing
        return lambda logits, x, labels, idx, view: losses.teacher_loss(logits, labels, smoothing)
    if stage == stages.STUDENT_NORMAL.name:
        on = cfg.kd.mse_input
        return lambda logits, x, labels, idx, view: losses.mse_onehot_loss(logits, labels, on)
    assert stages.get(stage).distills and teacher is not None, stage
    alpha, temperature = cfg.kd.alpha, cfg.kd.temperature
    return lambda logits, x, labels, idx, view: losses.kd_loss(logits, teacher(x, idx, view), labels,
                                                               alpha, temperature)
