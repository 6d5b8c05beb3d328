"""Ensembles of teachers (kd.ensemble=N): members trained and resumed as stages of their own,
their caches combined exactly as the live ensemble, fingerprints that follow every member,
adopted members of other architectures, and the refusals of what cannot make an ensemble.

In process, on real components (training, the caches, the CLI's exit codes) with the smoke
preset's synthetic data held on the device.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kd_ddp import cli, ensemble, losses, stages
from kd_ddp.augment import StudentInput
from kd_ddp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kd_ddp.config import Config, ConfigError, load_config
from kd_ddp.data import PreparedData, TrainLoader, prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.fingerprints import accepted_fingerprints, finished_summary, stage_fingerprint
from kd_ddp.models import build_model
from kd_ddp.precision import amp_dtype, precision_name
from kd_ddp.teacher_logits import CacheError, LogitsCache
from kd_ddp.train import Preempted, train_stage

ENV = DistEnv()


def _cfg(run_dir: Path, cache_dir: Path, *overrides: str) -> Config:
    return load_config("smoke", [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled",
                                 "tracking.progress=false", "data.loader=device", "optim.epochs=1", *overrides])


def _hash(run_dir: Path, stage: str) -> str:
    return json.loads((run_dir / stage / "summary.json").read_text())["weights_hash"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Config, PreparedData]:
    """An ensemble of 3 smoke teachers, trained one epoch each, their caches in float32."""
    run_dir = tmp_path_factory.mktemp("ensemble")
    cfg = _cfg(run_dir, cache_dir, "kd.ensemble=3", "kd.cache_dtype=float32")
    cli.run_stages(cfg, ENV, stages.TEACHER.command, "kd")
    data = prepare_data(cfg, ENV)
    cli.cache_logits(cfg, ENV, data)
    return cfg, data


# -- members: stages of their own -------------------------------------------------------


@pytest.mark.fast
def test_member_seeds_differ_per_member_and_per_run_seed() -> None:
    seeds = {(s, i): ensemble.member_seed(s, i) for s in (0, 1, 2) for i in (1, 2, 3)}
    assert [seeds[(s, 1)] for s in (0, 1, 2)] == [0, 1, 2]  # member 1 is the run's own teacher
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())


def test_members_are_trained_one_by_one_and_each_is_kept(tmp_path: Path, cache_dir: Path) -> None:
    """`train-teacher --member 2` trains teacher-2 alone; `train-teacher` then trains the other
    two and keeps teacher-2 as it was (its checkpoint untouched). The members differ."""
    cfg = _cfg(tmp_path, cache_dir, "kd.ensemble=3")
    result = cli.run_stages(cfg, ENV, stages.TEACHER.command, "kd", member=2)
    assert list(result) == ["teacher_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher-2"]
    ckpt = tmp_path / "teacher-2" / "checkpoint.pt"
    before = (ckpt.stat().st_mtime_ns, _hash(tmp_path, "teacher-2"))
    result = cli.run_stages(cfg, ENV, stages.TEACHER.command, "kd")
    assert list(result) == ["teacher", "teacher_2", "teacher_3"]
    assert (ckpt.stat().st_mtime_ns, _hash(tmp_path, "teacher-2")) == before
    hashes = {_hash(tmp_path, s) for s in ("teacher", "teacher-2", "teacher-3")}
    assert len(hashes) == 3
    state = load_checkpoint(tmp_path / "teacher-3" / "checkpoint.pt")
    assert state["fingerprint_fields"]["seed"] == ensemble.member_seed(0, 3)
    assert state["fingerprint_fields"]["stage"] == "teacher-3"


def test_a_member_stopped_mid_training_resumes_to_the_same_weights(tmp_path: Path, cache_dir: Path) -> None:
    """SIGTERM in teacher-2's second epoch checkpoints it; the rerun resumes it alone and ends
    with the weights of an uninterrupted run."""
    overrides = ("kd.ensemble=2", "optim.epochs=2")
    reference = _cfg(tmp_path / "reference", cache_dir, *overrides)
    data = prepare_data(reference, ENV)
    train_stage(ensemble.member_config(reference, 2), ENV, data, "teacher-2")

    cfg = _cfg(tmp_path / "run", cache_dir, *overrides)
    member = ensemble.member_config(cfg, 2)
    metrics = cfg.run_dir / "teacher-2" / "metrics.jsonl"

    def stop_after_first_epoch() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=stop_after_first_epoch, daemon=True)
    killer.start()
    with pytest.raises(Preempted):
        train_stage(member, ENV, data, "teacher-2")
    killer.join()
    assert not (cfg.run_dir / "teacher").exists()
    state = load_checkpoint(cfg.run_dir / "teacher-2" / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) != (1, 0)  # stopped inside the second epoch
    train_stage(member, ENV, data, "teacher-2")
    assert _hash(cfg.run_dir, "teacher-2") == _hash(reference.run_dir, "teacher-2")


# -- the ensemble's logits: cached == live ------------------------------------------------


@pytest.mark.fast
def test_ensemble_logits_are_the_mean_of_probabilities_at_t() -> None:
    torch.manual_seed(0)
    z = torch.randn(3, 5, 10) * 4
    for t in (1.0, 4.0):
        combined = losses.ensemble_logits(z, t)
        assert torch.allclose((combined / t).softmax(-1), (z / t).softmax(-1).mean(0), atol=1e-6)
    assert torch.equal(losses.ensemble_logits(z[:1], 2.0).softmax(-1).argmax(-1), z[0].argmax(-1))


def test_cached_ensemble_equals_the_live_ensemble(trained: tuple[Config, PreparedData]) -> None:
    """The student's batches of two views: the members' caches combined at load give the live
    ensemble's logits on the same pixels (float32 cache: within float rounding)."""
    cfg, data = trained
    dtype = amp_dtype(cfg, ENV.device)
    cached, records, models = ensemble.ensemble_source(cfg, data, ENV, dtype)
    live = ensemble.live_ensemble(models, cfg.kd.temperature, ENV.device, dtype)
    student_input = StudentInput.of(cfg, *data.stats(ENV.device))
    loader = TrainLoader(cfg, data, ENV)
    for view in range(cfg.kd.views):
        for images, _, idx in loader.epoch(view):
            x = student_input(images, idx, view)
            torch.testing.assert_close(cached(x, idx, view), live(x, idx, view), atol=1e-4, rtol=1e-4)
    assert len(records) == 3 and len({r.weights for r in records}) == 3


def test_a_float16_cache_is_the_live_ensemble_within_its_rounding(trained: tuple[Config, PreparedData],
                                                                 tmp_path: Path) -> None:
    cfg, data = trained
    half = _cfg(cfg.run_dir, cfg.data.cache_dir, "kd.ensemble=3", "kd.cache_dtype=float16", "kd.views=1")
    links = tmp_path / "run"
    links.mkdir()
    for stage in stages.teachers(3):
        (links / stage.name).symlink_to(cfg.run_dir / stage.name)
    half.run.dir = str(links)
    cli.cache_logits(half, ENV, data)
    dtype = amp_dtype(half, ENV.device)
    cached, _, models = ensemble.ensemble_source(half, data, ENV, dtype)
    live = ensemble.live_ensemble(models, half.kd.temperature, ENV.device, dtype)
    images, _, idx = next(iter(TrainLoader(half, data, ENV).epoch(0)))
    x = StudentInput.of(half, *data.stats(ENV.device))(images, idx, 0)
    want = live(x, idx, 0)
    # fp16 keeps 11 significant bits: each member's logit within 2**-11 of its size, and the
    # combination (a log-mean-exp at T) moves by at most that much
    tolerance = float(want.abs().max()) * 2**-10
    torch.testing.assert_close(cached(x, idx, 0), want, atol=tolerance, rtol=0)


# -- fingerprints follow every member ------------------------------------------------------


def test_a_changed_member_is_refused_by_its_cache_and_the_ensemble_students_fingerprint(
        trained: tuple[Config, PreparedData], tmp_path: Path) -> None:
    cfg, data = trained
    precision = precision_name(amp_dtype(cfg, ENV.device))
    _, records = ensemble.load_members(cfg, data, ENV)
    before = stage_fingerprint(cfg, stages.STUDENT_KD_ENSEMBLE.name, data, precision, records)
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("teacher", "teacher-3", "teacher-logits", "teacher-logits-2", "teacher-logits-3"):
        (copy / name).symlink_to(cfg.run_dir / name)
    (copy / "teacher-2").mkdir()
    for f in ("summary.json", "metrics.jsonl"):
        (copy / "teacher-2" / f).write_bytes((cfg.run_dir / "teacher-2" / f).read_bytes())
    state = load_checkpoint(cfg.run_dir / "teacher-2" / "checkpoint.pt")
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first] = state["model"][first] + 0.01
    save_checkpoint(copy / "teacher-2" / "checkpoint.pt", state)
    changed = _cfg(copy, cfg.data.cache_dir, "kd.ensemble=3", "kd.cache_dtype=float32")
    _, after_records = ensemble.load_members(changed, data, ENV)
    assert [r.weights for r in after_records][::2] == [r.weights for r in records][::2]
    assert after_records[1].weights != records[1].weights
    after = stage_fingerprint(changed, stages.STUDENT_KD_ENSEMBLE.name, data, precision, after_records)
    assert after["kd"]["ensemble"][1]["teacher_weights"] == after_records[1].weights
    assert accepted_fingerprints(after).isdisjoint(accepted_fingerprints(before))
    with pytest.raises(CacheError, match="teacher-logits-2 was built for another setting"):
        LogitsCache(changed, data, after_records[1], ENV.device, member=2)
    LogitsCache(changed, data, after_records[2], ENV.device, member=3)  # the others still fit


def test_the_ensemble_student_is_trained_then_reused_and_records_its_teachers(
        trained: tuple[Config, PreparedData]) -> None:
    cfg, data = trained
    summary = train_stage(cfg, ENV, data, stages.STUDENT_KD_ENSEMBLE.name)
    facts = summary["ensemble"]
    assert facts["size"] == 3 and facts["rule"] == ensemble.RULE
    assert [m["stage"] for m in facts["members"]] == ["teacher", "teacher-2", "teacher-3"]
    for member in facts["members"]:
        assert member["weights"] == _hash(cfg.run_dir, member["stage"])
    assert 0.0 <= facts["test_acc"] <= 1.0
    path = cfg.run_dir / stages.STUDENT_KD_ENSEMBLE.name / "summary.json"
    stamp = path.stat().st_mtime_ns
    assert train_stage(cfg, ENV, data, stages.STUDENT_KD_ENSEMBLE.name)["fingerprint"] == summary["fingerprint"]
    assert path.stat().st_mtime_ns == stamp  # finished: reused, not trained again
    fp = json.loads(path.read_text())["fingerprint"]
    assert finished_summary(path, {fp}) is not None


# -- adopted members -----------------------------------------------------------------------


def test_adopted_members_of_other_architectures(trained: tuple[Config, PreparedData], tmp_path: Path) -> None:
    """Member 2 adopted from another run dir whose teacher is a teacher_cnn_lite (its
    checkpoint records the architecture: @PATH), member 3 from a plain state_dict file made
    as student_cnn (FORM@PATH). Each is evaluated and kept in its own entry; the ensemble
    student's record names both architectures."""
    cfg, data = trained
    other = _cfg(tmp_path / "other", cfg.data.cache_dir, "model.teacher=teacher_cnn_lite")
    train_stage(other, ENV, data, stages.TEACHER.name)
    torch.manual_seed(1)
    plain = tmp_path / "plain.pt"
    as_student_cnn = _cfg(tmp_path, cfg.data.cache_dir, "model.teacher=student_cnn")
    torch.save(build_model(as_student_cnn, stages.TEACHER_ROLE, data.num_classes).state_dict(), plain)
    run = _cfg(tmp_path / "run", cfg.data.cache_dir, "kd.ensemble=3", "kd.teacher=live",
               f"kd.ensemble_members=@{other.run_dir},student_cnn@{plain}")
    (run.run_dir).mkdir()
    (run.run_dir / "teacher").symlink_to(cfg.run_dir / "teacher")
    result = cli.run_stages(run, ENV, stages.TEACHER.command, "kd")
    assert result["teacher_2"]["adopted_from"] == str((other.run_dir / "teacher" / "checkpoint.pt").resolve())
    assert result["teacher_3"]["adopted_from"] == str(plain.resolve())
    _, records = ensemble.load_members(run, data, ENV)
    assert records[1].model == ["teacher_cnn_lite", 8, 32, 0.25]
    assert records[2].model == ["student_cnn", 8, 32, 0.25]  # the teacher's sizes, the form given
    summary = train_stage(run, ENV, data, stages.STUDENT_KD_ENSEMBLE.name)
    assert [m["model"][0] for m in summary["ensemble"]["members"]] == ["teacher_cnn", "teacher_cnn_lite",
                                                                         "student_cnn"]


# -- refusals: exit 2 with a message ----------------------------------------------------------


def _exit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.run_command(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize(("overrides", "message"), [
    (["kd.ensemble=1"], "kd.ensemble=1: an ensemble needs at least 2 teachers"),
    (["kd.ensemble=-2"], "kd.ensemble=-2: an ensemble needs at least 2 teachers"),
    (["kd.ensemble_members=teacher_cnn_lite"], "kd.ensemble=0: an ensemble needs at least 2 teachers"),
    (["kd.ensemble=3", "kd.ensemble_members=teacher_cnn_lite"], "lists 1 member(s), kd.ensemble=3 needs 2"),
    (["kd.ensemble=2", "kd.ensemble_members=techer_cnn"], "did you mean 'teacher_cnn'"),
    (["kd.ensemble=2", "kd.ensemble_members=teacher_cnn@"], "no path after '@'"),
])
def test_bad_ensemble_settings_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: list[str],
                                      message: str) -> None:
    code, err = _exit(capsys, "pipeline", "--preset", "smoke", f"run.dir={tmp_path}", *overrides)
    assert code == 2 and message in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.fast
def test_commands_for_an_ensemble_the_config_has_not_exit_2(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    code, err = _exit(capsys, "train-student", "--mode", "kd-ensemble", "--preset", "smoke", f"run.dir={tmp_path}")
    assert code == 2 and "--mode kd-ensemble trains the student of an ensemble: set kd.ensemble=N" in err
    code, err = _exit(capsys, "train-teacher", "--member", "4", "--preset", "smoke", f"run.dir={tmp_path}",
                      "kd.ensemble=3")
    assert code == 2 and "--member 4: this config has 3 teacher(s)" in err
    code, err = _exit(capsys, "cache-logits", "--member", "2", "--preset", "smoke", f"run.dir={tmp_path}",
                      "kd.ensemble=3")
    assert code == 2 and "--member is for train-teacher only" in err


@pytest.mark.fast
def test_a_member_that_does_not_exist_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for entry, message in ((f"@{tmp_path / 'nowhere'}", "does not exist"),
                           (f"@{tmp_path}", "holds no finished teacher"),
                           (f"teacher_cnn@{tmp_path / 'missing.pt'}", "does not exist")):
        code, err = _exit(capsys, "train-teacher", "--preset", "smoke", f"run.dir={tmp_path / 'run'}",
                          "kd.ensemble=2", f"kd.ensemble_members={entry}")
        assert code == 2 and message in err and "member 2" in err, err


def test_a_plain_state_dict_without_its_form_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "cache")
    torch.save(build_model(cfg, stages.TEACHER_ROLE, 10).state_dict(), tmp_path / "w.pt")
    code, err = _exit(capsys, "train-teacher", "--preset", "smoke", f"run.dir={tmp_path / 'run'}",
                      "kd.ensemble=2", f"kd.ensemble_members=@{tmp_path / 'w.pt'}")
    assert code == 2 and "records no architecture (a plain state_dict): write it as FORM@PATH" in err, err


def test_members_trained_on_other_data_or_classes_exit_2(capsys: pytest.CaptureFixture[str],
                                                          trained: tuple[Config, PreparedData],
                                                          tmp_path: Path) -> None:
    cfg, _ = trained
    for name, overrides, message in (("fewer-classes", ["data.synthetic_classes=5"], "trained for 5 classes"),
                                     ("more-samples", ["data.synthetic_train=320"], "was trained on other data")):
        other = _cfg(tmp_path / name, cfg.data.cache_dir, *overrides)
        data = prepare_data(other, ENV)
        train_stage(other, ENV, data, stages.TEACHER.name)
        code, err = _exit(capsys, "train-teacher", "--preset", "smoke", f"run.dir={tmp_path / ('run-' + name)}",
                          f"data.cache_dir={cfg.data.cache_dir}", "data.loader=device", "optim.epochs=1",
                          "tracking.wandb.mode=disabled", "kd.ensemble=2", f"kd.ensemble_members=@{other.run_dir}")
        assert code == 2 and message in err and "member 2" in err, err


@pytest.mark.fast
def test_member_config_names_the_member_out_of_range(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="no teacher 2 in an ensemble of 1"):
        ensemble.member_config(cfg, 2)
    assert ensemble.member_config(cfg, 1) is cfg
    with pytest.raises(CheckpointError, match="does not exist"):
        ensemble.adopted_source(tmp_path / "x.pt", 2, needs_record=True)
