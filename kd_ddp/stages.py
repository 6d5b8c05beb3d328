"""The pipeline's stages, defined once; every other module names them through this one.

Three words, kept apart everywhere:

- **role**: the kind of model a stage trains, `teacher` or `student`. Models
  (`model.teacher`, `model.student_width`, ...) and the per-role optimizer fields
  (`optim.teacher_epochs`, `optim.student_lr`, ...) are chosen by role.
- **stage**: one unit of the pipeline's work. Its `name` is its entry in the run dir
  (`teacher/`, `teacher-logits/`, `student-kd/`), its W&B `job_type`, and the `stage` of its
  summary; it also has its own lock, Slurm step, Slurm resources and report key.
- **command**: a word of the CLI (`kd-ddp train-student --mode kd`). A command runs one
  stage, chosen by `--mode` for `train-student`; `pipeline` runs them all, in order.

The names below are those on disk, in W&B and in Slurm submissions since before this module
existed, kept as they were so that existing run dirs and submissions stay valid: that is
why a teacher's lock and Slurm step are `train-teacher` while its directory is `teacher`.

An ensemble (`kd.ensemble=N`, N >= 2) adds a numbered family: teachers 2..N (`teacher-2/`,
... beside `teacher/`, which is member 1), each a stage of its own with its own lock, Slurm
step, fingerprint and resume, and a third student, `student-kd-ensemble`, distilled from all
N. `pipeline(n)` orders them; `PIPELINE` is the pipeline of one teacher (n = 0 or 1).
"""

from __future__ import annotations

from dataclasses import dataclass

TEACHER_ROLE = "teacher"
STUDENT_ROLE = "student"
ROLES = (TEACHER_ROLE, STUDENT_ROLE)


@dataclass(frozen=True)
class Stage:
    name: str  # run-dir entry, W&B job_type, summary "stage"
    command: str  # the CLI command that runs it
    lock: str  # its lock in the run dir (`.kd-ddp.<lock>.lock`)
    step: str  # its step's key in a Slurm submission (job names, dependencies, --steps)
    resources: str  # the config section of its Slurm job's resources: slurm.<resources>.*
    mode: str = ""  # `train-student --mode <mode>`
    role: str = ""  # the model it trains; "" for a stage that trains none
    key: str = ""  # its key in results.json and in a pipeline's result ("student_kd")
    label: str = ""  # its name in the report's tables and plots
    builds: tuple[str, ...] = ()  # the roles of the models it builds (the KD student: its teacher too)
    member: int = 0  # a teacher's place in the ensemble, 1..N (teacher/ is 1); 0 for the other stages
    ensemble: bool = False  # the KD student of the ensemble (its teachers: every member)

    @property
    def trains(self) -> bool:
        return bool(self.role)

    @property
    def distills(self) -> bool:
        """A KD student: it reads a teacher's (or the ensemble's) logits."""
        return self.role == STUDENT_ROLE and TEACHER_ROLE in self.builds


PREPARE = Stage("prepare-data", command="prepare-data", lock="prepare-data", step="prepare-data",
                resources="prepare_data")
TEACHER = Stage("teacher", command="train-teacher", lock="train-teacher", step="train-teacher", resources="teacher",
                role=TEACHER_ROLE, key="teacher", label="Teacher (CE)", builds=(TEACHER_ROLE,), member=1)
CACHE = Stage("teacher-logits", command="cache-logits", lock="cache-logits", step="cache-logits",
              resources="cache_logits", builds=(TEACHER_ROLE,))
STUDENT_NORMAL = Stage("student-normal", command="train-student", mode="normal", lock="train-student-normal",
                       step="student-normal", resources="student", role=STUDENT_ROLE, key="student_normal",
                       label="Student (MSE, normal)", builds=(STUDENT_ROLE,))
STUDENT_KD = Stage("student-kd", command="train-student", mode="kd", lock="train-student-kd", step="student-kd",
                   resources="student", role=STUDENT_ROLE, key="student_kd", label="Student (KD)",
                   builds=(TEACHER_ROLE, STUDENT_ROLE))
STUDENT_KD_ENSEMBLE = Stage("student-kd-ensemble", command="train-student", mode="kd-ensemble",
                            lock="train-student-kd-ensemble", step="student-kd-ensemble", resources="student",
                            role=STUDENT_ROLE, key="student_kd_ensemble", label="Student (KD, ensemble)",
                            builds=(TEACHER_ROLE, STUDENT_ROLE), ensemble=True)
REPORT = Stage("report", command="report", lock="report", step="report", resources="report")

PIPELINE = (PREPARE, TEACHER, CACHE, STUDENT_NORMAL, STUDENT_KD, REPORT)  # one teacher, in the order they run
TRAINED = tuple(s for s in PIPELINE if s.trains)  # the three models: teacher, normal student, KD student
STUDENTS = (STUDENT_NORMAL, STUDENT_KD)
ALL_COMMAND = "pipeline"
COMMANDS = tuple(dict.fromkeys(s.command for s in PIPELINE)) + (ALL_COMMAND,)  # the CLI's, in order
MODES = (*(s.mode for s in STUDENTS), STUDENT_KD_ENSEMBLE.mode)  # train-student's --mode choices
RUN_DIR_LOCK = ""  # the whole run dir's lock (`.kd-ddp.lock`), taken by `pipeline`
MEMBER_SEP = "-"  # teacher-2, train-teacher-2, teacher-logits-2


def teacher_member(i: int) -> Stage:
    """Teacher `i` of an ensemble (1 is TEACHER itself): its own run-dir entry, lock, Slurm
    step and report key, the teacher's command and resources."""
    if i < 1:
        raise ValueError(f"ensemble members are numbered from 1, not {i}")
    if i == 1:
        return TEACHER
    return Stage(f"{TEACHER.name}{MEMBER_SEP}{i}", command=TEACHER.command, lock=f"{TEACHER.lock}{MEMBER_SEP}{i}",
                 step=f"{TEACHER.step}{MEMBER_SEP}{i}", resources=TEACHER.resources, role=TEACHER_ROLE,
                 key=f"{TEACHER.key}_{i}", label=f"Teacher {i} (CE)", builds=(TEACHER_ROLE,), member=i)


def teachers(n: int) -> tuple[Stage, ...]:
    """The teachers of an ensemble of `n` (n = 0 or 1: the one teacher)."""
    return tuple(teacher_member(i) for i in range(1, max(n, 1) + 1))


def cache_name(member: int) -> str:
    """The run-dir entry of member `member`'s logits cache (`teacher-logits`, `teacher-logits-2`, ...)."""
    return CACHE.name if member == 1 else f"{CACHE.name}{MEMBER_SEP}{member}"


def pipeline(n: int = 0) -> tuple[Stage, ...]:
    """The pipeline's stages in the order they run, for an ensemble of `n` teachers (0 or 1:
    PIPELINE). The ensemble's teachers follow the first; the KD student of one teacher stays,
    so the report compares it with the ensemble's on the same data and seed."""
    if n < 2:
        return PIPELINE
    return (PREPARE, *teachers(n), CACHE, STUDENT_NORMAL, STUDENT_KD, STUDENT_KD_ENSEMBLE, REPORT)


def trained(n: int = 0) -> tuple[Stage, ...]:
    """The models a pipeline of an ensemble of `n` trains, in order."""
    return tuple(s for s in pipeline(n) if s.trains)


_BY_NAME = {s.name: s for s in (*PIPELINE, STUDENT_KD_ENSEMBLE)}


def get(name: str) -> Stage:
    """The stage whose run-dir entry is `name`, a teacher member's (`teacher-3`) included
    (KeyError naming the known ones otherwise)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    base, sep, number = name.rpartition(MEMBER_SEP)
    if sep and base == TEACHER.name and number.isdigit() and int(number) >= 2 and number == str(int(number)):
        return teacher_member(int(number))
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(_BY_NAME)} and {TEACHER.name}-<i> (i >= 2)")


def of_command(command: str, mode: str = "kd", n: int = 0, member: int = 0) -> tuple[Stage, ...]:
    """The stages a CLI command runs in a pipeline of an ensemble of `n`: one (train-student:
    the one of `mode`), every teacher for train-teacher (only `member` when > 0), or all for
    `pipeline`."""
    if command == ALL_COMMAND:
        return pipeline(n)
    chosen = tuple(s for s in pipeline(n) if s.command == command and (not s.mode or s.mode == mode))
    return tuple(s for s in chosen if s.member == member) if member and command == TEACHER.command else chosen


def role_of(name: str) -> str:
    """The role of a training stage's model (teacher or student)."""
    role = get(name).role
    if not role:
        raise KeyError(f"stage {name!r} trains no model")
    return role


def roles_built(command: str, mode: str = "kd", n: int = 0) -> list[str]:
    """The roles of the models a CLI command builds, in ROLES order (checked before any data
    is prepared: kd_ddp.preflight)."""
    built = {role for stage in of_command(command, mode, n) for role in stage.builds}
    return [role for role in ROLES if role in built]
