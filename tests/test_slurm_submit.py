"""The Slurm launcher's submitter and watcher (launch/slurm.py) without a cluster: what
`--wait` makes of the states Slurm reports, and the jobs it submits. They need submitit,
not Slurm, so these tests run where tests/test_slurm.py is skipped."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import pytest

from kd_ddp import stages
from kd_ddp.config import load_config
from launch.plan import Step, pipeline_steps, select_steps, sweep_steps
from launch.slurm import (
    WAITING,
    Submitted,
    doomed,
    print_submission,
    settle,
    stage_job,
    tracked_jobs,
    write_record,
)
from launch.tasks import StageJob, SweepReportJob

pytestmark = pytest.mark.fast  # in-process, no subprocess (tests/conftest.py)


def record_steps(steps: list[Step]) -> dict[str, dict[str, Any]]:
    """The steps as a submission's record lists them: key -> its job (what `doomed` reads)."""
    return {s.key: {"key": s.key, "after": s.after, "after_any": s.after_any} for s in steps}


# -- doomed: what a failure leaves unable to run ----------------------------------------


def test_a_failure_dooms_every_step_that_waits_for_it_with_afterok() -> None:
    steps = record_steps(pipeline_steps(load_config("smoke", ["kd.teacher=cached"])))
    assert doomed(set(), steps) == set()
    assert doomed({"prepare-data"}, steps) == set(steps) - {"prepare-data"}
    # Through the cache to the KD student, and from it to the report; the normal student,
    # which reads only the data, trains on.
    assert doomed({"train-teacher"}, steps) == {"cache-logits", "student-kd", "report"}
    assert doomed({"student-normal"}, steps) == {"report"}
    assert doomed({"report"}, steps) == set()
    # Two failures: the union of what each dooms, the failed steps themselves not included.
    assert doomed({"student-normal", "student-kd"}, steps) == {"report"}


def test_a_failure_dooms_only_the_steps_submitted_with_it() -> None:
    steps = pipeline_steps(load_config("smoke", ["kd.teacher=live"]))
    subset = record_steps(select_steps(steps, {"train-teacher", "student-kd"}))
    assert doomed({"train-teacher"}, subset) == {"student-kd"}


def test_a_failed_sweep_point_leaves_the_report_to_run(tmp_path: Path) -> None:
    """The sweep's report waits for the students with afterany: a failed point (which fails
    the array's step) leaves it to run and name the hole; a failed cache dooms it."""
    steps = record_steps(sweep_steps("smoke", [f"run.dir={tmp_path}"], {"seed": ["0", "1"]}))
    assert doomed({"student-kd"}, steps) == set()
    assert doomed({"student-normal", "student-kd"}, steps) == set()
    assert doomed({"cache-logits-seed1"}, steps) == {"student-kd", "report"}


# -- settle: sacct's PREEMPTED, told apart by the queue ---------------------------------


def test_a_preempted_job_back_in_the_queue_is_still_waiting() -> None:
    for queued in (("PENDING", "BeginTime"), ("REQUEUED", "None"), ("RUNNING", "None")):
        assert settle("PREEMPTED", queued) == queued[0]
        assert settle("PREEMPTED", queued) in WAITING


def test_a_preempted_job_out_of_the_queue_is_over() -> None:
    # PreemptMode=CANCEL: gone from the queue (None), or still held by slurmctld as ended.
    assert settle("PREEMPTED", None) == "PREEMPTED"
    assert settle("PREEMPTED", ("PREEMPTED", "None")) == "PREEMPTED"
    assert "PREEMPTED" not in WAITING


def test_other_states_are_sacct_s() -> None:
    """Only PREEMPTED is ambiguous: the queue's view never overrides another sacct state."""
    assert settle("COMPLETED", ("COMPLETING", "None")) == "COMPLETED"
    assert settle("FAILED", None) == "FAILED"
    assert settle("RUNNING", ("PENDING", "Priority")) == "RUNNING"
    assert settle("CANCELLED", ("PENDING", "Dependency")) == "CANCELLED"


# -- the jobs submitted -----------------------------------------------------------------


def test_each_step_submits_its_stage_s_command_and_mode(tmp_path: Path) -> None:
    cfg = load_config("smoke")
    jobs = {s.key: stage_job(s, cfg) for s in pipeline_steps(cfg)}
    assert {k: (j.stage, j.mode) for k, j in jobs.items()} == {
        "prepare-data": ("prepare-data", "kd"), "train-teacher": ("train-teacher", "kd"),
        "cache-logits": ("cache-logits", "kd"), "student-normal": ("train-student", "normal"),
        "student-kd": ("train-student", "kd"), "report": ("report", "kd")}
    assert {k: j.runs.step for k, j in jobs.items()} == {k: k for k in jobs}
    report = sweep_steps("smoke", [f"run.dir={tmp_path}"], {"kd.alpha": ["0.1", "0.9"]})[-1]
    job = stage_job(report, report.configs[0])
    assert isinstance(job, SweepReportJob) and job.stage == "report"
    assert job.points == {"a0.1": str(tmp_path / "sweep" / "a0.1"), "a0.9": str(tmp_path / "sweep" / "a0.9")}


def test_a_job_pickled_before_the_split_still_loads() -> None:
    """Jobs submitted before launch/slurm.py was split hold `launch.slurm.StageJob` in their
    pickle, and submitit loads it again when the job starts or is requeued."""
    job = StageJob({"seed": 3}, "train-student", "normal", gpus=1)
    data = cloudpickle.dumps(job)
    assert b"launch.tasks" in data  # by reference to the module, as submitit pickles it
    old = data.replace(b"launch.tasks", b"launch.slurm")  # same length: the pickle stays valid
    loaded = pickle.loads(old)
    assert type(loaded) is StageJob
    assert vars(loaded) == {"config": {"seed": 3}, "stage": "train-student", "mode": "normal", "gpus": 1,
                            "member": 0}


def test_a_job_pickled_before_members_runs_as_it_did() -> None:
    """A job queued before teacher arrays has no `member` in its pickle: it loads, and runs its
    command as before (member 0: train-teacher trains every teacher of the config)."""
    job = StageJob({"seed": 3}, "train-teacher", "kd", gpus=0)
    del job.member  # as pickled by the code before
    loaded = pickle.loads(cloudpickle.dumps(job))
    assert "member" not in vars(loaded)
    assert loaded.task_member == 0 and loaded.runs == stages.TEACHER and loaded.label == "train-teacher"


# -- an ensemble's teacher array ----------------------------------------------------------


def test_each_task_of_the_teacher_array_trains_its_member() -> None:
    cfg = load_config("smoke", ["kd.ensemble=3"])
    steps = {s.key: s for s in pipeline_steps(cfg)}
    teachers = steps["train-teacher"]
    jobs = [stage_job(teachers, c, i) for i, c in enumerate(teachers.configs)]
    assert [(j.stage, j.member) for j in jobs] == [("train-teacher", 1), ("train-teacher", 2), ("train-teacher", 3)]
    assert [j.runs for j in jobs] == list(stages.teachers(3))
    assert [j.label for j in jobs] == ["train-teacher [teacher]", "train-teacher [teacher-2]",
                                       "train-teacher [teacher-3]"]
    assert all(j.config["kd"]["ensemble"] == 3 and j.config["seed"] == cfg.seed for j in jobs)  # the run's config
    ens = stage_job(steps["student-kd-ensemble"], cfg)
    assert (ens.stage, ens.mode, ens.member, ens.runs) == ("train-student", "kd-ensemble", 0,
                                                           stages.STUDENT_KD_ENSEMBLE)
    assert stage_job(steps["cache-logits"], cfg).member == 0


def test_a_failed_teacher_member_dooms_the_cache_and_every_distilled_student() -> None:
    steps = record_steps(pipeline_steps(load_config("smoke", ["kd.ensemble=2"])))
    assert doomed({"train-teacher"}, steps) == {"cache-logits", "student-kd", "student-kd-ensemble", "report"}
    assert doomed({"student-kd-ensemble"}, steps) == {"report"}


@dataclass
class FakeJob:
    job_id: str
    paths: Any


def test_the_record_and_the_submission_name_the_array_s_tasks_by_member(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config("smoke", ["kd.ensemble=2", f"run.dir={tmp_path}"])
    steps = pipeline_steps(cfg, ["train-teacher", "cache-logits"])
    subs = [Submitted(steps[0], [FakeJob(f"7_{i}", SimpleNamespace(stdout=tmp_path / f"7_{i}_0_log.out"))
                                 for i in range(2)], []),
            Submitted(steps[1], [FakeJob("8", SimpleNamespace(stdout=tmp_path / "8_0_log.out"))], ["7"])]
    assert subs[0].job_id == "7" and [subs[0].label(i) for i in range(2)] == [
        "train-teacher[teacher]", "train-teacher[teacher-2]"]
    record = json.loads(write_record("pipeline", cfg, subs, tmp_path).read_text())
    teachers, cache = record["jobs"]
    assert (teachers["key"], teachers["job_id"], cache["depends_on"]) == ("train-teacher", "7", ["7"])
    assert teachers["array"] == [
        {"name": "teacher", "job_id": "7_0", "log": str(tmp_path / "7_0_0_log.out"), "run_dir": str(tmp_path),
         "member": 1, "stage_dir": str(tmp_path / "teacher")},
        {"name": "teacher-2", "job_id": "7_1", "log": str(tmp_path / "7_1_0_log.out"), "run_dir": str(tmp_path),
         "member": 2, "stage_dir": str(tmp_path / "teacher-2")}]
    # status and --wait follow each task under its member's name
    assert [(t.key, t.label, t.job_id) for t in tracked_jobs(record)] == [
        ("train-teacher", "train-teacher[teacher]", "7_0"), ("train-teacher", "train-teacher[teacher-2]", "7_1"),
        ("cache-logits", "cache-logits", "8")]
    print_submission(subs, tmp_path / "r.json", hold=False)
    out = capsys.readouterr().out
    assert re.search(r"^train-teacher +job 7 +- +array of 2 ", out, re.M), out
    assert re.search(rf"^  teacher-2 +job 7_1 +member 2, dir {re.escape(str(tmp_path / 'teacher-2'))}$", out, re.M), out
