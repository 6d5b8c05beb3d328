"""What a command can refuse before any data is prepared, on every rank: each model it
builds (name, import, what the callable returns, its output shape), the teacher file to
adopt, and train.sync_bn on this device."""

from __future__ import annotations

import json
from pathlib import Path

from kd_ddp import ensemble, stages
from kd_ddp.config import Config
from kd_ddp.data import prepared_dir
from kd_ddp.distributed import DistEnv
from kd_ddp.models import check_models, use_sync_bn
from kd_ddp.teachers import read_teacher_file, refuse_another_architecture


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


def preflight(cfg: Config, env: DistEnv, command: str, mode: str = "kd", member: int = 0) -> None:
    """Refuse now what would fail after the data is prepared (ConfigError, CheckpointError)."""
    n = ensemble.size(cfg)
    roles = stages.roles_built(command, mode, n)
    check_models(cfg, roles, provisional_classes(cfg))
    if cfg.model.teacher_checkpoint and stages.TEACHER in stages.of_command(command, mode, n, member):
        source = Path(cfg.model.teacher_checkpoint)
        refuse_another_architecture(cfg, read_teacher_file(source)[1], source)
    if stages.TEACHER_ROLE in roles and n > 1:
        check_members(cfg)
    if roles:
        use_sync_bn(cfg, env.device, env.world_size)


def check_members(cfg: Config) -> None:
    """Every ensemble member's config resolves (an adopted file exists and records what it must)
    and its model builds; an adopted file holds weights of its architecture."""
    for stage in stages.teachers(ensemble.size(cfg))[1:]:
        mcfg = ensemble.member_config(cfg, stage.member)
        check_models(mcfg, [stages.TEACHER_ROLE], provisional_classes(cfg))
        if mcfg.model.teacher_checkpoint:
            source = Path(mcfg.model.teacher_checkpoint)
            refuse_another_architecture(mcfg, read_teacher_file(source)[1], source)
