"""What a finished stage or a checkpoint was made under, and when it may be reused.

A stage's fingerprint holds everything that changes its result (data content, model,
optimizer settings of its role, seed, precision actually used, and for the KD student the
teacher's whole record). A finished stage is reused only when its summary's fingerprint is
one of `accepted_fingerprints`; a checkpoint made under another is refused, naming what
differs (`refuse_another_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_ddp import stages
from kd_ddp.checkpoint import CheckpointError
from kd_ddp.config import Config, describe_differences, fingerprint
from kd_ddp.data import PreparedData
from kd_ddp.models import architecture
from kd_ddp.teacher_logits import RECORD_FIELDS, TeacherRecord

# how an ensemble's members are combined (kd_ddp.ensemble, losses.ensemble_logits), as fingerprints record it
ENSEMBLE_RULE = "mean-of-probabilities-at-T"

# optim fields of one role (teacher or students): a stage's fingerprint has them as its
# resolved "epochs", "lr" and "warmup_epochs"
PER_ROLE_OPTIM = ("teacher_epochs", "student_epochs", "student_lr", "student_warmup_epochs")


def stage_fingerprint(cfg: Config, stage: str, data: PreparedData, precision: str,
                      teacher: TeacherRecord | list[TeacherRecord] | None = None) -> dict[str, Any]:
    """Everything that changes a stage's result; a checkpoint or summary made under another
    is refused (checkpoint) or not reused (summary). `teacher`: the KD student's teacher's
    record, or the ensemble student's members' records (a changed member changes it)."""
    role = stages.role_of(stage)
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
    if stage == stages.STUDENT_NORMAL.name:
        fp["mse_input"] = cfg.kd.mse_input
    if stages.get(stage).ensemble:
        members = teacher if isinstance(teacher, list) else []
        fp["kd"] = {"alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature, "teacher": cfg.kd.teacher,
                    "ensemble": [m.key() for m in members], "rule": ENSEMBLE_RULE}
    elif stages.get(stage).distills:
        # the teacher's whole record (weights, architecture, the precision of its logits), not
        # its weights alone: another architecture of the same parameters gives other logits
        record = teacher.key() if isinstance(teacher, TeacherRecord) else {"teacher_weights": ""}
        fp["kd"] = {"alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature, "teacher": cfg.kd.teacher} | record
    if "kd" in fp and cfg.kd.teacher == "cached":  # a live teacher reads no cache: its views and dtype do not matter
        fp["kd"] |= {"views": cfg.kd.views, "cache_dtype": cfg.kd.cache_dtype}
    return fp


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
