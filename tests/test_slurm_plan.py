"""The Slurm launcher's planner (launch/plan.py) without a cluster: which jobs a submission
makes, with which configs and dependencies. Nothing here needs Slurm or submitit, so these
tests run where tests/test_slurm.py is skipped."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  # check_paths builds models: torch's first import runs ldconfig, not in a fast test

import launch
import launch.plan as launch_plan
from kd_ddp import stages
from kd_ddp.config import ConfigError, load_config
from launch.plan import (
    PIPELINE_STEPS,
    STEPS,
    Step,
    absolute_paths,
    check_paths,
    expand_wildcards,
    parse_stages,
    pipeline_steps,
    plan_submission,
    point_name,
    select_steps,
    split_grid,
    sweep_steps,
)

pytestmark = pytest.mark.fast  # in-process, no subprocess (tests/conftest.py)


def edges(steps: list[Step]) -> list[tuple[str, list[str]]]:
    return [(s.key, s.after) for s in steps]


def smoke(tmp_path: Path, *overrides: str) -> list[str]:
    return [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]


def test_planner_imports_without_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner runs where submitit is not installed: a None entry in sys.modules makes
    `import submitit` fail, as it would there."""
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError):
        importlib.import_module("submitit")
    # A fresh import of the planner; the test's end puts the one the other tests use back.
    monkeypatch.delitem(sys.modules, "launch.plan")
    monkeypatch.setattr(launch, "plan", launch.plan)
    plan = importlib.import_module("launch.plan")
    assert plan is not launch_plan
    assert [s.key for s in plan.pipeline_steps(load_config("smoke"))] == list(PIPELINE_STEPS)


def test_pipeline_steps_wait_for_the_stage_they_read() -> None:
    """The KD student reads the cache (or the live teacher); the normal student only the data,
    so it can train beside the teacher."""
    cached = pipeline_steps(load_config("smoke", ["kd.teacher=cached"]))
    assert edges(cached) == [
        ("prepare-data", []), ("train-teacher", ["prepare-data"]), ("cache-logits", ["train-teacher"]),
        ("student-normal", ["prepare-data"]), ("student-kd", ["cache-logits"]),
        ("report", ["student-normal", "student-kd"])]
    assert [s.stage for s in cached] == list(stages.PIPELINE)
    # The job's command and mode, as the record names them (a student's mode, else run_stage's default).
    assert [(s.stage.command, s.mode) for s in cached[3:5]] == [("train-student", "normal"), ("train-student", "kd")]
    assert cached[0].mode == "kd"
    # A live teacher: no cache stage, the students wait for the teacher itself.
    live = pipeline_steps(load_config("smoke", ["kd.teacher=live"]))
    assert edges(live)[2:4] == [("student-normal", ["prepare-data"]), ("student-kd", ["train-teacher"])]
    assert stages.CACHE.step not in [s.key for s in live]


def test_each_step_asks_for_its_stage_s_resources() -> None:
    cfg = load_config("smoke", ["slurm.teacher.tasks_per_node=2", "slurm.student.cpus_per_task=3"])
    by_key = {s.key: s for s in pipeline_steps(cfg)}
    assert by_key["train-teacher"].resources.world_size == 2
    assert by_key["student-normal"].resources.cpus_per_task == by_key["student-kd"].resources.cpus_per_task == 3
    assert by_key["report"].resources is cfg.slurm.report


def test_select_steps_waits_for_the_nearest_kept_ancestors() -> None:
    steps = pipeline_steps(load_config("smoke", ["kd.teacher=cached"]))
    # Dropped steps pass their own parents on, each parent once, in order.
    assert edges(select_steps(steps, {"prepare-data", "student-kd", "report"})) == [
        ("prepare-data", []), ("student-kd", ["prepare-data"]), ("report", ["prepare-data", "student-kd"])]
    assert edges(select_steps(steps, {"train-teacher", "report"})) == [
        ("train-teacher", []), ("report", ["train-teacher"])]
    assert edges(select_steps(steps, {"report"})) == [("report", [])]
    assert select_steps(steps, set()) == []
    # The steps given stay as they were: the selection is made of copies.
    assert steps[-1].after == ["student-normal", "student-kd"]


def test_select_steps_keeps_the_sweep_report_s_afterany() -> None:
    steps = [Step(stages.TEACHER, []), Step(stages.STUDENT_KD, [], after=["train-teacher"]),
             Step(stages.REPORT, [], after=["train-teacher"], after_any=["student-kd"])]
    assert [(s.key, s.after, s.after_any) for s in select_steps(steps, {"student-kd", "report"})] == [
        ("student-kd", [], []), ("report", [], ["student-kd"])]


def test_stages_option() -> None:
    assert parse_stages("all") == list(STEPS)
    assert parse_stages(" train-teacher, train-student ") == ["train-teacher", "student-normal", "student-kd"]
    with pytest.raises(ConfigError, match=r"unknown stage 'teacher'; stages: prepare-data,.*train-student \(= every"):
        parse_stages("teacher")


def test_plan_submission_pipeline_subset_and_refusals(tmp_path: Path) -> None:
    warnings: list[str] = []
    cfg, steps = plan_submission("pipeline", "smoke", "train-teacher,report", smoke(tmp_path), warnings.append)
    assert edges(steps) == [("train-teacher", []), ("report", ["train-teacher"])]
    assert cfg.run_dir == tmp_path / "run" and warnings == []
    with pytest.raises(ConfigError, match="several values are for `sweep`"):
        plan_submission("pipeline", "smoke", "all", smoke(tmp_path, "kd.alpha=0.1,0.5"), warnings.append)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan_submission("sweep", "smoke", "all", smoke(tmp_path), warnings.append)
    with pytest.raises(ConfigError, match="--stages is for `pipeline` only"):
        plan_submission("sweep", "smoke", "report", smoke(tmp_path, "kd.alpha=0.1,0.5"), warnings.append)


# -- an ensemble of teachers: one job array ---------------------------------------------


def test_an_ensemble_s_teachers_are_one_array_the_cache_waits_for() -> None:
    cfg = load_config("smoke", ["kd.ensemble=3", "kd.teacher=cached"])
    steps = pipeline_steps(cfg)
    assert edges(steps) == [
        ("prepare-data", []), ("train-teacher", ["prepare-data"]), ("cache-logits", ["train-teacher"]),
        ("student-normal", ["prepare-data"]), ("student-kd", ["cache-logits"]),
        ("student-kd-ensemble", ["cache-logits"]),
        ("report", ["student-normal", "student-kd", "student-kd-ensemble"])]
    assert [s.key for s in steps] == list(STEPS)
    teachers = steps[1]
    # One array, a task per member, named after the member's stage; each trains its member alone.
    assert teachers.stage == stages.TEACHER and teachers.key == "train-teacher"
    assert teachers.names == ["teacher", "teacher-2", "teacher-3"] and teachers.members == [1, 2, 3]
    assert len(teachers.configs) == 3 and all(c is cfg for c in teachers.configs)  # run_stage derives each member's
    assert [teachers.task_stage(i) for i in range(3)] == list(stages.teachers(3))
    assert teachers.resources is cfg.slurm.teacher
    # The other steps are plain jobs; the ensemble's student runs train-student --mode kd-ensemble.
    assert all(not s.names and not s.members for s in steps if s is not teachers)
    ens = steps[5]
    assert (ens.stage, ens.stage.command, ens.mode) == (stages.STUDENT_KD_ENSEMBLE, "train-student", "kd-ensemble")
    assert ens.resources is cfg.slurm.student
    # Every stage of the ensemble's pipeline has its job: the members as the array's tasks.
    planned = [s.task_stage(i) for s in steps for i in range(len(s.configs))]
    assert planned == list(stages.pipeline(3))


def test_an_ensemble_with_a_live_teacher_waits_for_the_whole_array() -> None:
    steps = pipeline_steps(load_config("smoke", ["kd.ensemble=2", "kd.teacher=live"]))
    assert edges(steps) == [
        ("prepare-data", []), ("train-teacher", ["prepare-data"]), ("student-normal", ["prepare-data"]),
        ("student-kd", ["train-teacher"]), ("student-kd-ensemble", ["train-teacher"]),
        ("report", ["student-normal", "student-kd", "student-kd-ensemble"])]
    assert steps[1].names == ["teacher", "teacher-2"]


def test_selecting_from_an_ensemble_keeps_the_array() -> None:
    steps = pipeline_steps(load_config("smoke", ["kd.ensemble=2"]))
    kept = select_steps(steps, {"train-teacher", "student-kd-ensemble", "report"})
    assert edges(kept) == [("train-teacher", []), ("student-kd-ensemble", ["train-teacher"]),
                           ("report", ["train-teacher", "student-kd-ensemble"])]
    assert kept[0].names == ["teacher", "teacher-2"] and kept[0].members == [1, 2]


def test_stages_option_with_an_ensemble(tmp_path: Path) -> None:
    ens = load_config("smoke", ["kd.ensemble=2"])
    assert parse_stages("cache-logits,train-student", ens) == [
        "cache-logits", "student-normal", "student-kd", "student-kd-ensemble"]
    assert parse_stages("train-student", load_config("smoke")) == ["student-normal", "student-kd"]
    with pytest.raises(ConfigError, match="student-kd-ensemble is the student of an ensemble: set kd.ensemble=N"):
        parse_stages("student-kd-ensemble", load_config("smoke"))
    with pytest.raises(ConfigError, match=r"'train-teacher-2' \(an ensemble's teachers are one job array, train-"):
        parse_stages("train-teacher-2", ens)
    _, steps = plan_submission("pipeline", "smoke", "train-teacher,student-kd-ensemble",
                               smoke(tmp_path, "kd.ensemble=2"), [].append)
    assert edges(steps) == [("train-teacher", []), ("student-kd-ensemble", ["train-teacher"])]
    assert steps[0].members == [1, 2]


def test_a_sweep_of_an_ensemble_is_refused_before_any_dir_is_made(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kd.ensemble=2: a sweep shares one teacher, not an ensemble"):
        plan_submission("sweep", "smoke", "all", smoke(tmp_path, "kd.ensemble=2", "kd.alpha=0.1,0.9"), [].append)
    assert not (tmp_path / "run").exists()


def test_sweep_grid_and_plan(tmp_path: Path) -> None:
    base, grid = split_grid(["kd.alpha=0.1,0.9", "seed=0,1", "tracking.wandb.tags=a,b", "optim.epochs=3",
                             "slurm.teacher.extra=--mail-type=END,FAIL"])
    # list and text fields keep their commas
    assert base == ["tracking.wandb.tags=a,b", "optim.epochs=3", "slurm.teacher.extra=--mail-type=END,FAIL"]
    assert grid == {"kd.alpha": ["0.1", "0.9"], "seed": ["0", "1"]}
    assert point_name({"kd.alpha": "0.5", "kd.temperature": "4", "seed": "0"}) == "a0.5-t4-s0"
    with pytest.raises(ValueError, match="cannot be swept"):
        split_grid(["model.teacher_width=8,16"])  # would need another teacher
    assert expand_wildcards(["slurm.*.cpus_per_task=1"])[:2] == ["slurm.prepare_data.cpus_per_task=1",
                                                                  "slurm.teacher.cpus_per_task=1"]

    steps: list[Step] = sweep_steps("smoke", [f"run.dir={tmp_path}"], grid)
    assert [(s.key, s.after) for s in steps] == [
        ("prepare-data", []), ("train-teacher", ["prepare-data"]),
        ("cache-logits", ["train-teacher"]), ("cache-logits-seed1", ["train-teacher"]),
        ("student-normal", ["prepare-data"]),
        ("student-kd", ["cache-logits", "cache-logits-seed1"]), ("report", ["cache-logits", "cache-logits-seed1"])]
    # The report runs once every student ended, however (afterany), and names the missing points.
    assert steps[-1].after_any == ["student-normal", "student-kd"]
    assert list(steps[-1].points) == ["a0.1-s0", "a0.1-s1", "a0.9-s0", "a0.9-s1"]
    kd = steps[5]
    assert kd.names == ["a0.1-s0", "a0.1-s1", "a0.9-s0", "a0.9-s1"]
    # One teacher for all; one logits cache per seed (its views are augmented with the seed).
    point = tmp_path / "sweep" / "a0.9-s1"
    assert (point / "teacher").resolve() == (tmp_path / "teacher").resolve()
    assert (point / "teacher-logits").resolve() == (tmp_path / "sweep-caches" / "seed1" / "teacher-logits")
    assert steps[3].configs[0].seed == 1 and kd.configs[3].kd.alpha == 0.9
    assert steps[3].stage == stages.CACHE  # a seed's cache is the cache stage under a key of its own


def test_sweep_with_a_live_teacher_has_no_cache(tmp_path: Path) -> None:
    steps = sweep_steps("smoke", [f"run.dir={tmp_path}", "kd.teacher=live"], {"kd.alpha": ["0.1", "0.9"]})
    assert edges(steps) == [
        ("prepare-data", []), ("train-teacher", ["prepare-data"]), ("student-normal", ["prepare-data"]),
        ("student-kd", ["train-teacher"]), ("report", ["train-teacher"])]
    assert not (tmp_path / "sweep" / "a0.1" / "teacher-logits").exists()
    assert (tmp_path / "sweep" / "a0.1" / "teacher").is_symlink()


def test_model_paths_are_pinned_and_bad_models_refused_before_submission(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs run in another directory: a user's model directory and an adopted teacher's file
    are made absolute; a model that would fail in a job hours later is refused at submission."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "flat.py").write_text(
        "import torch\n\ndef build(num_classes):\n    return torch.nn.Linear(3, num_classes)  # not for images\n")
    pins = absolute_paths("smoke", ["model.python_path=mods", "model.teacher_checkpoint=t.pt"])
    assert f"model.python_path={tmp_path / 'mods'}" in pins
    assert f"model.teacher_checkpoint={tmp_path / 't.pt'}" in pins
    cfg = load_config("smoke", [*pins, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}",
                                "model.student=flat:build"])
    with pytest.raises(ConfigError, match="flat:build"):
        check_paths(cfg, needs_data=True)
    cfg.model.student = "student_cnn"
    with pytest.raises(ConfigError, match=f"model.teacher_checkpoint {tmp_path / 't.pt'} does not exist"):
        check_paths(cfg, needs_data=True)
