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

A numbered family of stages (teacher 1..N of an ensemble) is a function here that makes
their `Stage` records, and `PIPELINE` the place that orders them.
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

    @property
    def trains(self) -> bool:
        return bool(self.role)


PREPARE = Stage("prepare-data", command="prepare-data", lock="prepare-data", step="prepare-data",
                resources="prepare_data")
TEACHER = Stage("teacher", command="train-teacher", lock="train-teacher", step="train-teacher", resources="teacher",
                role=TEACHER_ROLE, key="teacher", label="Teacher (CE)", builds=(TEACHER_ROLE,))
CACHE = Stage("teacher-logits", command="cache-logits", lock="cache-logits", step="cache-logits",
              resources="cache_logits", builds=(TEACHER_ROLE,))
STUDENT_NORMAL = Stage("student-normal", command="train-student", mode="normal", lock="train-student-normal",
                       step="student-normal", resources="student", role=STUDENT_ROLE, key="student_normal",
                       label="Student (MSE, normal)", builds=(STUDENT_ROLE,))
STUDENT_KD = Stage("student-kd", command="train-student", mode="kd", lock="train-student-kd", step="student-kd",
                   resources="student", role=STUDENT_ROLE, key="student_kd", label="Student (KD)",
                   builds=(TEACHER_ROLE, STUDENT_ROLE))
REPORT = Stage("report", command="report", lock="report", step="report", resources="report")

PIPELINE = (PREPARE, TEACHER, CACHE, STUDENT_NORMAL, STUDENT_KD, REPORT)  # in the order they run
TRAINED = tuple(s for s in PIPELINE if s.trains)  # the three models: teacher, normal student, KD student
STUDENTS = (STUDENT_NORMAL, STUDENT_KD)
ALL_COMMAND = "pipeline"
COMMANDS = tuple(dict.fromkeys(s.command for s in PIPELINE)) + (ALL_COMMAND,)  # the CLI's, in order
MODES = tuple(s.mode for s in STUDENTS)  # train-student's --mode choices
RUN_DIR_LOCK = ""  # the whole run dir's lock (`.kd-ddp.lock`), taken by `pipeline`

_BY_NAME = {s.name: s for s in PIPELINE}


def get(name: str) -> Stage:
    """The stage whose run-dir entry is `name` (KeyError naming the known ones otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(_BY_NAME)}") from None


def of_command(command: str, mode: str = "kd") -> tuple[Stage, ...]:
    """The stages a CLI command runs: one (train-student: the one of `mode`), or all for `pipeline`."""
    if command == ALL_COMMAND:
        return PIPELINE
    return tuple(s for s in PIPELINE if s.command == command and (not s.mode or s.mode == mode))


def role_of(name: str) -> str:
    """The role of a training stage's model (teacher or student)."""
    role = get(name).role
    if not role:
        raise KeyError(f"stage {name!r} trains no model")
    return role


def roles_built(command: str, mode: str = "kd") -> list[str]:
    """The roles of the models a CLI command builds, in ROLES order (checked before any data
    is prepared: kd_ddp.preflight)."""
    built = {role for stage in of_command(command, mode) for role in stage.builds}
    return [role for role in ROLES if role in built]
