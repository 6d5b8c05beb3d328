"""The teacher is identified by its whole record, not its weights alone (issue 21, item 4).

torchvision's mobilenet_v3_small with and without the CIFAR stem has the same parameters:
one state_dict loads into both and gives other logits. The logits cache and the KD student
must follow the architecture (and the precision the logits were computed in), and a run
dir recorded before the record existed stays valid where nothing differs. All in process,
on real components: an adopted teacher, the cache build, the KD student's training.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd_ddp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kd_ddp.cli import cache_logits
from kd_ddp.config import Config, fingerprint, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.fingerprints import accepted_fingerprints, finished_summary, stage_fingerprint
from kd_ddp.locks import file_lock
from kd_ddp.models import build_model
from kd_ddp.objectives import teacher_logits_source
from kd_ddp.teacher_logits import CacheError, LogitsCache, cache_dir, cache_lock_path
from kd_ddp.teachers import load_trained_teacher
from kd_ddp.train import train_stage

pytestmark = pytest.mark.fast

MOBILENET = "torchvision:mobilenet_v3_small"

Make = Callable[..., Config]


def _factory(root: Path, cache_dir: Path, *teacher: str) -> Make:
    """Configs of one run dir (root/run) whose teacher is adopted from root/teacher.pt."""

    def make(*overrides: str) -> Config:
        return load_config("smoke", [
            f"run.dir={root / 'run'}", f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled",
            "tracking.progress=false", "data.loader=device", "optim.epochs=1", *teacher,
            f"model.teacher_checkpoint={root / 'teacher.pt'}", *overrides])

    return make


@pytest.fixture()
def make_cfg(tmp_path: Path, cache_dir: Path) -> Make:
    """The seed's teacher_cnn, its initial weights adopted: quick."""
    make = _factory(tmp_path, cache_dir)
    torch.manual_seed(0)
    torch.save(build_model(make(), "teacher", 10).state_dict(), tmp_path / "teacher.pt")
    return make


@pytest.fixture()
def mobilenet_cfg(tmp_path: Path, cache_dir: Path) -> Make:
    """A mobilenet_v3_small, untrained (what matters is which logits its weights give, not
    their accuracy), and one cached view: its forward at 32 px with the CIFAR stem is slow."""
    make = _factory(tmp_path, cache_dir, f"model.teacher={MOBILENET}", "kd.views=1")
    torch.save(_teacher_weights(make()), tmp_path / "teacher.pt")
    return make


def _teacher_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """Initial weights whose logits are far from 0 (as a trained teacher's): BatchNorm statistics
    of a few random batches (at their initial ones the activations fade to ~1e-7 through the
    layers) and a larger head."""
    torch.manual_seed(0)
    model = build_model(cfg, "teacher", 10)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain mean over the batches
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    state = model.state_dict()
    state["classifier.3.weight"] *= 100
    return state


def _adopt_and_cache(cfg: Config) -> dict:
    env = DistEnv()
    data = prepare_data(cfg, env)
    train_stage(cfg, env, data, "teacher")
    return cache_logits(cfg, env, data)


def _logits(cfg: Config) -> np.ndarray:
    return np.load(cache_dir(cfg) / "logits.npy").astype(np.float32)


def test_the_cache_and_the_kd_student_follow_the_teachers_architecture(mobilenet_cfg: Make) -> None:
    """The same weights with and without the CIFAR stem: the cache is rebuilt (other logits),
    and the KD student trained on the first is not resumed under the second."""
    stem = mobilenet_cfg("model.cifar_stem=true")
    first = _adopt_and_cache(stem)
    first_logits = _logits(stem)
    env = DistEnv()
    train_stage(stem, env, prepare_data(stem, env), "student-kd")

    plain = mobilenet_cfg("model.cifar_stem=false")
    second = _adopt_and_cache(plain)  # re-adopted under this architecture, then the cache rebuilt
    assert second["key"]["teacher_weights"] == first["key"]["teacher_weights"]  # one set of weights...
    assert first["key"]["teacher_model"]["cifar_stem"] is True
    assert second["key"]["teacher_model"]["cifar_stem"] is False  # ...two teachers
    assert np.abs(_logits(plain) - first_logits).max() > 1e-2
    with pytest.raises(CheckpointError, match=r"made with another config .*\n.*kd\.teacher_model\.cifar_stem: "
                                              r"checkpoint has True, this run needs False"):
        train_stage(plain, env, prepare_data(plain, env), "student-kd")


def test_a_teacher_made_as_another_architecture_is_refused(make_cfg: Make) -> None:
    """The run dir's teacher (and a kd-ddp checkpoint to adopt) records its architecture: its
    weights also fit a model that differs in what has no parameters (here the dropout; the
    CIFAR stem of torchvision's models), but that model is not the teacher that was made."""
    _adopt_and_cache(make_cfg("model.dropout=0.25"))
    other = make_cfg("model.dropout=0.5")
    env = DistEnv()
    data = prepare_data(other, env)
    with pytest.raises(CheckpointError, match=r"holds a teacher made as \['teacher_cnn', 8, 32, 0\.25\], this "
                                              r"config's teacher is \['teacher_cnn', 8, 32, 0\.5\]"):
        cache_logits(other, env, data)
    own = other.run_dir / "teacher" / "checkpoint.pt"
    adopt = make_cfg("model.dropout=0.5", f"model.teacher_checkpoint={own}", f"run.dir={other.run_dir.parent / 'b'}")
    with pytest.raises(CheckpointError, match="holds a teacher made as"):
        train_stage(adopt, env, data, "teacher")


def test_the_precision_of_the_logits_is_part_of_the_cache_key(make_cfg: Make) -> None:
    off = make_cfg("train.amp=off")
    assert _adopt_and_cache(off)["key"]["teacher_precision"] == "off"
    bf16 = make_cfg("train.amp=bf16")
    env = DistEnv()
    data = prepare_data(bf16, env)
    _, record = load_trained_teacher(bf16, data, env)
    with pytest.raises(CacheError, match=r"teacher_precision: cache has 'off', this run needs 'bfloat16'"):
        LogitsCache(bf16, data, record, env.device)
    assert cache_logits(bf16, env, data)["key"]["teacher_precision"] == "bfloat16"  # rebuilt


# -- run dirs recorded before the teacher record -------------------------------------------


def _old_kd_fingerprint(fields: dict) -> dict:
    """The KD student's fingerprint as kd-ddp recorded it until today: the teacher's weights
    hash alone in its kd part."""
    kd = fields["kd"]
    old_kd = {"alpha": kd["alpha"], "temperature": kd["temperature"], "teacher": kd["teacher"],
              "teacher_weights": kd["teacher_weights"], "views": kd["views"], "cache_dtype": kd["cache_dtype"]}
    return fields | {"kd": old_kd}


def _record_the_old_way(cfg: Config) -> None:
    """Rewrite the cache manifest, the KD student's summary and checkpoint as the code before
    today wrote them (the same run, its records in the old form)."""
    manifest_path = cache_dir(cfg) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    key = manifest["key"]
    manifest["key"] = {k: key[k] for k in ("teacher_weights", "train_data", "augmentation", "views", "seed", "dtype")}
    manifest_path.write_text(json.dumps(manifest))
    out = cfg.run_dir / "student-kd"
    state = load_checkpoint(out / "checkpoint.pt")
    old = _old_kd_fingerprint(state["fingerprint_fields"])
    state.pop("history", None)  # nor did checkpoints hold their metrics records
    save_checkpoint(out / "checkpoint.pt", state | {"fingerprint": fingerprint(old), "fingerprint_fields": old})
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary | {"fingerprint": fingerprint(old)}))


def test_a_run_dir_recorded_before_the_teacher_record_stays_valid(make_cfg: Make) -> None:
    """Nothing differs: the old cache is used as it is and the finished KD student is kept.
    A KD checkpoint of the old form resumes too (the summary removed: a stage cut short)."""
    cfg = make_cfg()
    _adopt_and_cache(cfg)
    env = DistEnv()
    data = prepare_data(cfg, env)
    train_stage(cfg, env, data, "student-kd")
    _record_the_old_way(cfg)
    manifest = (cache_dir(cfg) / "manifest.json").read_text()
    summary = json.loads((cfg.run_dir / "student-kd" / "summary.json").read_text())

    assert cache_logits(cfg, env, data) == json.loads(manifest)  # up to date: not rebuilt
    assert (cache_dir(cfg) / "manifest.json").read_text() == manifest
    assert train_stage(cfg, env, data, "student-kd") == summary  # "already trained"
    (cfg.run_dir / "student-kd" / "summary.json").unlink()
    resumed = train_stage(cfg, env, data, "student-kd")  # the 1-epoch checkpoint: nothing left to train
    assert (resumed["weights_hash"], resumed["test_acc"]) == (summary["weights_hash"], summary["test_acc"])
    assert resumed["fingerprint"] != summary["fingerprint"]  # recorded the new way from now on
    assert train_stage(cfg, env, data, "student-kd") == resumed


def test_an_old_record_is_not_trusted_where_the_teacher_was_made_in_another_precision(make_cfg: Make) -> None:
    """The old cache key does not say which precision its logits were computed in. It is taken
    for this run's only when the teacher checkpoint records this run's precision; here the
    teacher was adopted under bf16 and this run is in fp32: the cache is rebuilt, the KD
    student's old record not accepted."""
    cfg = make_cfg("train.amp=off")
    _adopt_and_cache(cfg)
    env = DistEnv()
    data = prepare_data(cfg, env)
    summary = train_stage(cfg, env, data, "student-kd")
    _record_the_old_way(cfg)
    teacher_ckpt = cfg.run_dir / "teacher" / "checkpoint.pt"
    state = load_checkpoint(teacher_ckpt)
    fields = state["fingerprint_fields"] | {"precision": "bfloat16"}
    save_checkpoint(teacher_ckpt, state | {"fingerprint_fields": fields})

    _, record = load_trained_teacher(cfg, data, env)
    assert not record.legacy_ok
    with pytest.raises(CacheError, match=r"teacher_model: cache has None.*\n.*teacher_precision: cache has None"
                                         r"(.|\n)*built before they were recorded"):
        LogitsCache(cfg, data, record, env.device)
    fp = stage_fingerprint(cfg, "student-kd", data, "off", record)
    old = json.loads((cfg.run_dir / "student-kd" / "summary.json").read_text())["fingerprint"]
    assert old not in accepted_fingerprints(fp, cfg.optim.student_lr, record.legacy_ok)
    assert old in accepted_fingerprints(fp, cfg.optim.student_lr, True)  # the same record, trusted
    assert fp == load_checkpoint(cfg.run_dir / "student-kd" / "checkpoint.pt")["fingerprint_fields"] | {
        "kd": fp["kd"]}  # nothing else differs
    assert summary["fingerprint"] == fingerprint(fp)
    assert finished_summary(cfg.run_dir / "student-kd" / "summary.json",
                            accepted_fingerprints(fp, cfg.optim.student_lr, record.legacy_ok)) is None


# -- one lock for building and reading the cache (item 5) ----------------------------------


def test_the_kd_student_reads_the_cache_under_the_lock_cache_logits_builds_under(make_cfg: Make) -> None:
    """While the cache's lock is held (as cache-logits holds it while it rebuilds), a KD
    student waits, and never sees the rebuild half done (manifest gone, array empty); it reads
    the cache once the lock is free."""
    cfg = make_cfg()
    _adopt_and_cache(cfg)
    env = DistEnv()
    data = prepare_data(cfg, env)
    d = cache_dir(cfg)
    files = {name: (d / name).read_bytes() for name in ("manifest.json", "logits.npy")}
    got: list = []

    def read() -> None:
        try:
            got.append(teacher_logits_source(cfg, data, env, None))
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            got.append(e)

    with file_lock(cache_lock_path(cfg)):
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=3.0)
        assert reader.is_alive() and not got  # waiting for the lock
        (d / "manifest.json").unlink()  # what build_cache does first
        (d / "logits.npy").write_bytes(b"")
        time.sleep(1.0)
        for name, blob in files.items():
            (d / name).write_bytes(blob)
    reader.join(timeout=60)
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    lookup = got[0][0]
    np.testing.assert_array_equal(lookup(None, torch.arange(5), 1).float().numpy(), _logits(cfg)[1, :5])


def test_a_sweep_point_takes_the_lock_of_the_cache_it_links_to(tmp_path: Path) -> None:
    """A sweep point's run dir links teacher-logits to the base run's cache (launch/slurm.py):
    its KD students and the base's cache-logits take one lock, beside the real cache."""
    base, point = tmp_path / "base", tmp_path / "base" / "sweep" / "a0.5-t4"
    (base / "teacher-logits").mkdir(parents=True)
    point.mkdir(parents=True)
    (point / "teacher-logits").symlink_to("../../teacher-logits", target_is_directory=True)
    paths = {cache_lock_path(load_config("smoke", [f"run.dir={d}"])) for d in (base, point)}
    assert paths == {base.resolve() / ".kd-ddp.teacher-logits.lock"}
