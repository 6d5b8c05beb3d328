"""The teacher as later stages take it: the run dir's trained teacher, loaded and identified
by its whole record, or a teacher trained elsewhere adopted from a file
(`model.teacher_checkpoint`: weights only, checked against this config's architecture,
evaluated, then kept as the run dir's teacher)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_ddp import stages
from kd_ddp.checkpoint import (
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    load_weights_file,
    save_checkpoint,
    weights_hash,
)
from kd_ddp.config import Config, fingerprint
from kd_ddp.data import EvalLoader, PreparedData
from kd_ddp.distributed import DistEnv, barrier
from kd_ddp.evaluation import evaluate
from kd_ddp.fingerprints import accepted_fingerprints, finished_summary, refuse_another_config
from kd_ddp.metrics_io import write_metrics
from kd_ddp.models import architecture, describe, make_model, model_facts
from kd_ddp.precision import amp_dtype, precision_name
from kd_ddp.teacher_logits import TeacherRecord
from kd_ddp.tracking import StageTracker, machine, start_stage

log = logging.getLogger(__name__)

ROLE = stages.TEACHER_ROLE


def teacher_dir(cfg: Config, stage: str = stages.TEACHER.name) -> Path:
    """The run-dir entry of the teacher, or of ensemble member `stage` (`teacher-2`, ...)."""
    return cfg.run_dir / stage


def load_trained_teacher(cfg: Config, data: PreparedData, env: DistEnv,
                         stage: str = stages.TEACHER.name) -> tuple[nn.Module, TeacherRecord]:
    """The run dir's teacher (or ensemble member `stage`, with `cfg` its member config:
    kd_ddp.ensemble.member_config), and its record: weights hash, architecture, and the
    precision this run computes its logits in. A checkpoint that records another architecture
    than this config's teacher is refused, even when its weights fit (same parameters, other stem)."""
    path = teacher_dir(cfg, stage) / "checkpoint.pt"
    if not (teacher_dir(cfg, stage) / "summary.json").is_file():
        member = stages.get(stage).member
        hint = f" --member {member}" if member > 1 else ""
        raise CheckpointError(f"no trained teacher in {path.parent}: run `kd-ddp {stages.TEACHER.command}{hint}` "
                              "first")
    state = load_checkpoint(path)
    held = state.get("fingerprint_fields", {})
    teacher = make_model(cfg, ROLE, data.num_classes, env.device)
    load_weights_into(teacher, state["model"], path, cfg, held=held.get("model"))
    refuse_another_architecture(cfg, held.get("model"), path)
    teacher.eval()
    precision = precision_name(amp_dtype(cfg, env.device))
    model = architecture(cfg, ROLE)
    record = TeacherRecord(weights_hash(teacher.state_dict()), model, precision,
                           legacy_ok=held.get("model") == model and held.get("precision") == precision)
    return teacher, record


def refuse_another_architecture(cfg: Config, held: Any, path: Path) -> None:
    """CheckpointError when a teacher file records another architecture than this config's
    teacher (None: it records none). Its weights may still load (torchvision's stem or the
    CIFAR one have the same parameters), but the model would not be the one trained."""
    want = architecture(cfg, ROLE)
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
        want = architecture(cfg, ROLE)
        detail = (f"it holds {held!r}, this config's teacher is {want!r}"
                  if held is not None and held != want else " ".join(lines[:2])[:600])
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


def adopt_teacher(cfg: Config, env: DistEnv, data: PreparedData, stage: str = stages.TEACHER.name) -> dict[str, Any]:
    """train-teacher with `model.teacher_checkpoint`: no training. The file's weights go into
    this config's teacher, which is evaluated on the test split as a trained one is, and kept
    as the run dir's teacher checkpoint (fingerprinted by the weights hash), so that the
    logits cache, the KD student and the report take it as they take a trained teacher. A
    trained teacher already in the run dir is never overwritten (refused, as resuming is).
    An ensemble member (`stage` teacher-<i>) is adopted the same way into its own entry."""
    source = Path(cfg.model.teacher_checkpoint)
    dtype = amp_dtype(cfg, env.device)
    teacher = make_model(cfg, ROLE, data.num_classes, env.device)
    weights, recorded = read_teacher_file(source)
    load_weights_into(teacher, weights, source, cfg, held=recorded)
    refuse_another_architecture(cfg, recorded, source)
    fp = {"stage": stage, "adopted": weights_hash(teacher.state_dict()), "data": data.content_hash,
          "model": architecture(cfg, ROLE), "precision": precision_name(dtype)}
    out = teacher_dir(cfg, stage)
    done = finished_summary(out / "summary.json", accepted_fingerprints(fp))
    if done is not None:
        if env.is_main:
            log.info("%s: already adopted from %s, test_acc=%.4f", stage, source, done["test_acc"])
        return done
    if (out / "checkpoint.pt").is_file():
        held = load_checkpoint(out / "checkpoint.pt")
        if "adopted" not in held.get("fingerprint_fields", {}):  # a trained teacher: keep it
            refuse_another_config(held, fp, out / "checkpoint.pt", accepted_fingerprints(fp))
    tracker = start_stage(cfg, stage, env) if env.is_main else StageTracker()
    try:
        summary = _evaluate_adopted(cfg, env, data, teacher, source, fp, stage)
    except BaseException:
        tracker.abort(1)
        raise
    tracker.finish(summary)
    barrier(env)
    return summary


def _evaluate_adopted(cfg: Config, env: DistEnv, data: PreparedData, teacher: nn.Module, source: Path,
                      fp: dict[str, Any], stage: str) -> dict[str, Any]:
    """The adopted teacher's test accuracy (every rank its shard), its summary; rank 0 writes
    the teacher's checkpoint, an empty metrics.jsonl (no epochs) and the summary."""
    dtype = amp_dtype(cfg, env.device)
    out = teacher_dir(cfg, stage)
    mean, std = data.stats(env.device)
    start = time.perf_counter()
    test_loss, test_acc = evaluate(teacher, EvalLoader(cfg, data, env), env, mean, std, cfg, dtype)
    summary = {
        "stage": stage, "adopted_from": str(source.resolve()), "test_acc": test_acc,
        "test_loss": test_loss, "epochs": 0, "train_time_s": 0.0, "images_per_s": 0.0,
        "eval_time_s": round(time.perf_counter() - start, 3), "world_size": env.world_size,
        "backend": env.backend, "device": str(env.device), "machine": machine(env), "amp": precision_name(dtype),
        "model": {"name": describe(cfg, ROLE), "arch": cfg.model.teacher} | model_facts(teacher, cfg.data.image_size),
        "weights_hash": fp["adopted"], "fingerprint": fingerprint(fp),
    }
    if env.is_main:
        save_checkpoint(out / "checkpoint.pt", {
            "model": teacher.state_dict(), "fingerprint": fingerprint(fp), "fingerprint_fields": fp,
            "config": cfg.to_dict(), "num_classes": data.num_classes, "adopted_from": summary["adopted_from"]})
        write_metrics(out / "metrics.jsonl", [])  # no epochs: nothing was trained
        atomic_write_json(out / "summary.json", summary)
        log.info("%s: adopted %s (%s), not trained: test_acc %.4f, test_loss %.4f", stage, source,
                 summary["model"]["name"], test_acc, test_loss)
    return summary
