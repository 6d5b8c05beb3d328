"""The plan of a submission: which jobs, with which configs and dependencies, before Slurm.

A pure planner: from the preset and overrides to `Step`s (one per job, or per job array),
each naming the stage it runs and the steps it waits for, in an order that submits parents
first. `pipeline` is the pipeline's stages in order (an ensemble's teachers as one job array,
a task per member, which the cache job waits for as a whole); `sweep` the same head (one teacher, a
logits cache per seed), then every point of the grid as one array of KD students in
`<run.dir>/sweep/<name>/`, beside one normal student, and a report that runs once they all
ended (afterany). A sweep's plan makes the points' run dirs and their links to the shared
teacher and caches; nothing here imports submitit or calls Slurm.

Also here: the paths the jobs need pinned (they run in another directory) and what is
refused before anything is submitted (`check_paths`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kd_ddp import ensemble, stages
from kd_ddp.config import Config, ConfigError, StageResources, load_config
from kd_ddp.stages import (
    CACHE,
    PREPARE,
    REPORT,
    STUDENT_KD,
    STUDENT_KD_ENSEMBLE,
    STUDENT_NORMAL,
    STUDENTS,
    TEACHER,
    Stage,
)

DEFAULT_MODE = "kd"  # kd_ddp.cli.run_stage's mode when none is given
# The steps of a pipeline of one teacher, in the order they are submitted.
PIPELINE_STEPS = tuple(s.step for s in stages.PIPELINE)
# Every step a pipeline may have, in that order: an ensemble's adds its student's. Its teachers
# are one job array, under the teacher's key (`train-teacher`), a task per member.
STEPS = (*PIPELINE_STEPS[:-1], STUDENT_KD_ENSEMBLE.step, REPORT.step)
# Sweepable keys change only the KD student: the teacher and the data stay shared.
SWEEPABLE = ("kd.alpha", "kd.temperature", "seed", "kd.teacher", "optim.student_epochs", "optim.student_lr",
             "optim.student_warmup_epochs", "model.student", "model.student_width", "model.student_hidden")
SHORT_NAMES = {"kd.alpha": "a", "kd.temperature": "t", "seed": "s"}


# -- the plan: which jobs, with which configs and dependencies --------------------------


@dataclass
class Step:
    """One job of a submission, or one job array (a config per task)."""

    stage: Stage  # the stage it runs
    configs: list[Config]  # one = a plain job, several = a job array
    after: list[str] = field(default_factory=list)  # keys of the steps it waits for (afterok)
    names: list[str] = field(default_factory=list)  # array tasks' names: sweep points, or teacher members' stages
    after_any: list[str] = field(default_factory=list)  # keys of steps it waits to end, however (afterany)
    points: dict[str, str] = field(default_factory=dict)  # sweep report: point name -> its run dir
    key: str = ""  # unique name of the job within one submission; default: the stage's step
    members: list[int] = field(default_factory=list)  # an ensemble's teacher array: the member of each task

    def task_stage(self, i: int) -> Stage:
        """The stage task `i` runs: its member's, in a teacher array; else the step's."""
        return stages.teacher_member(self.members[i]) if self.members else self.stage

    def __post_init__(self) -> None:
        self.key = self.key or self.stage.step

    @property
    def mode(self) -> str:
        """train-student's --mode; the other stages have always carried run_stage's default
        (in their jobs and in the submission's record), which they ignore."""
        return self.stage.mode or DEFAULT_MODE

    @property
    def resources(self) -> StageResources:
        return getattr(self.configs[0].slurm, self.stage.resources)


def pipeline_steps(cfg: Config, only: Iterable[str] = STEPS) -> list[Step]:
    """The pipeline as jobs, each waiting for the stages it reads; of them the steps in `only`.
    A KD student reads the logits cache (kd.teacher=cached) or the teacher; the normal student
    reads only the prepared data, so on a cluster it trains beside the teacher.

    An ensemble (kd.ensemble=N, N >= 2): its N teachers are one job array under the teacher's
    key, task i training member i+1 alone (`train-teacher --member i+1`), all at once; the
    cache job (every member's cache) waits for the array, which afterok on the array's id
    does for every task; its third student, student-kd-ensemble, is a job beside student-kd."""
    cached = cached_teacher(cfg)
    kd_heads = [CACHE.step] if cached else [TEACHER.step]
    students = students_of(cfg)
    steps = [Step(PREPARE, [cfg]),
             teacher_step(cfg),
             *([Step(CACHE, [cfg], after=[TEACHER.step])] if cached else []),
             *(Step(student, [cfg], after=student_after(student, kd_heads)) for student in students),
             Step(REPORT, [cfg], after=[student.step for student in students])]
    return select_steps(steps, set(only))


def student_after(student: Stage, kd_heads: list[str]) -> list[str]:
    """The steps a student's job waits for: a KD student, those that made what it reads of its
    teacher (`kd_heads`: the logits caches, or the teacher); the normal student, the data only."""
    return kd_heads if student.distills else [PREPARE.step]


def teacher_step(cfg: Config) -> Step:
    """The teacher's job; an ensemble's teachers as one array, a task (and a config) per member,
    named after the member's stage (teacher, teacher-2, ...)."""
    n = ensemble.size(cfg)
    if n < 2:
        return Step(TEACHER, [cfg], after=[PREPARE.step])
    members = stages.teachers(n)
    return Step(TEACHER, [cfg] * n, after=[PREPARE.step], names=[m.name for m in members],
                members=[m.member for m in members])


def students_of(cfg: Config) -> tuple[Stage, ...]:
    """The students a pipeline of this config trains: an ensemble's adds its own."""
    return (*STUDENTS, STUDENT_KD_ENSEMBLE) if ensemble.size(cfg) >= 2 else STUDENTS


def cached_teacher(cfg: Config) -> bool:
    """Whether the KD student reads the teacher's logits from a cache (a stage of its own)."""
    return cfg.kd.teacher == "cached"


def select_steps(steps: list[Step], keep: set[str]) -> list[Step]:
    """The steps in `keep`, each waiting for its nearest kept ancestors."""
    by_key = {s.key: s for s in steps}

    def kept_ancestors(key: str) -> list[str]:
        out: list[str] = []
        for parent in by_key[key].after:
            for k in [parent] if parent in keep else kept_ancestors(parent):
                if k not in out:
                    out.append(k)
        return out

    return [dataclasses.replace(s, after=kept_ancestors(s.key)) for s in steps if s.key in keep]


def parse_stages(text: str, cfg: Config | None = None) -> list[str]:
    """--stages: `all`, or steps by their keys, the students' command standing for every student
    of `cfg`'s pipeline (both; an ensemble's three). A step that pipeline has not is refused: the
    ensemble's student without kd.ensemble=N (no `cfg`: a pipeline of one teacher)."""
    if text == "all":
        return list(STEPS)
    students = [s.step for s in students_of(cfg)] if cfg is not None else [s.step for s in STUDENTS]
    wanted: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        expanded = students if name == STUDENT_KD.command else [name]
        for key in expanded:
            if key not in STEPS:
                member = key.startswith((TEACHER.step + stages.MEMBER_SEP, TEACHER.name + stages.MEMBER_SEP))
                hint = f" (an ensemble's teachers are one job array, {TEACHER.step})" if member else ""
                raise ConfigError(f"--stages: unknown stage {name!r}{hint}; stages: {', '.join(STEPS)}, "
                                  f"{STUDENT_KD.command} (= every student)")
            if key == STUDENT_KD_ENSEMBLE.step and key not in students:
                raise ConfigError(f"--stages: {key} is the student of an ensemble: set kd.ensemble=N (N >= 2)")
            wanted.append(key)
    return wanted


def expand_wildcards(overrides: list[str]) -> list[str]:
    """`slurm.*.field=v` -> the same override for every stage's resources."""
    sections = list(Config().slurm.stages())
    out: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.strip().startswith("slurm.*."):
            out += [f"slurm.{section}.{key.strip()[len('slurm.*.'):]}{sep}{value}" for section in sections]
        else:
            out.append(item)
    return out


def split_grid(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate `key=v1,v2,...` sweep axes from plain overrides. Only sweepable keys are axes:
    list and text fields keep their commas (tracking.wandb.tags=a,b, slurm.*.extra=--mail-type=END,FAIL)."""
    default = Config()
    base: list[str] = []
    grid: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        try:
            is_text = isinstance(functools.reduce(getattr, key.split("."), default), list | str)
        except AttributeError:  # unknown key: load_config says so, with a suggestion
            is_text = True
        if not sep or "," not in text or (is_text and key not in SWEEPABLE):
            base.append(item)
            continue
        if key not in SWEEPABLE:
            raise ConfigError(f"{key} cannot be swept: the sweep shares one teacher and data set; "
                              f"sweepable keys: {', '.join(SWEEPABLE)}")
        grid[key] = [v.strip() for v in text.split(",") if v.strip()]
    return base, grid


def point_name(point: dict[str, str]) -> str:
    parts = [f"{SHORT_NAMES[k]}{v}" if k in SHORT_NAMES else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return "-".join(parts).replace("/", "_")


def link(path: Path, target: Path) -> None:
    """Make `path` a relative symlink to `target` (which may not exist yet)."""
    rel = os.path.relpath(target, path.parent)
    if path.is_symlink() and os.readlink(path) == rel:
        return
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists and is not a link to {target}; use another run.dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(rel, target_is_directory=True)


def sweep_steps(preset: str, base_overrides: list[str], grid: dict[str, list[str]]) -> list[Step]:
    """The pipeline's head once, then the grid as one array of KD students sharing its teacher.

    A KD student reads its teacher and logits cache from its own run dir, so each point's dir
    gets symlinks to the shared ones. The cache holds views augmented with the seed, so each
    distinct seed gets its own cache (cheap: forward passes of the one teacher); a point with
    the teacher's seed uses the pipeline's own cache.
    """
    base = load_config(preset, base_overrides)
    if ensemble.size(base) >= 2:  # refused before any dir or link is made
        raise ConfigError(f"kd.ensemble={base.kd.ensemble}: a sweep shares one teacher, not an ensemble; "
                          "sweep without kd.ensemble, or submit a `pipeline` with the ensemble per setting")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points with the same name: {', '.join(sorted(names))}")
    caches: dict[int, Step] = {}
    configs: list[Config] = []
    for point, name in zip(points, names):
        cfg = load_config(preset, [*base_overrides, *(f"{k}={v}" for k, v in point.items()),
                                   f"run.dir={base.run_dir / 'sweep' / name}"])
        link(cfg.run_dir / TEACHER.name, base.run_dir / TEACHER.name)
        if cached_teacher(cfg):
            caches.setdefault(cfg.seed, cache_step(preset, base_overrides, base, cfg.seed))
            link(cfg.run_dir / CACHE.name, caches[cfg.seed].configs[0].run_dir / CACHE.name)
        configs.append(cfg)
    heads = [s.key for s in caches.values()] or [TEACHER.step]  # what the KD students read
    # The report waits for every student to end, completed or not (afterany), but only runs
    # once the teacher and the caches succeeded (afterok): a failed point leaves a hole in the
    # grid, which the report names, not a sweep without a report.
    return [*pipeline_steps(base, [PREPARE.step, TEACHER.step]), *caches.values(),
            Step(STUDENT_NORMAL, [base], after=student_after(STUDENT_NORMAL, heads)),
            Step(STUDENT_KD, configs, after=student_after(STUDENT_KD, heads), names=names),
            Step(REPORT, [base], after=heads, after_any=[student.step for student in STUDENTS],
                 points={n: str(c.run_dir) for n, c in zip(names, configs)})]


def cache_step(preset: str, base_overrides: list[str], base: Config, seed: int) -> Step:
    """The logits cache of `seed`: the pipeline's own for the teacher's seed, else one in a run
    dir of its own that links to the shared teacher."""
    if seed == base.seed:
        return Step(CACHE, [base], after=[TEACHER.step])
    run_dir = base.run_dir / "sweep-caches" / f"seed{seed}"
    link(run_dir / TEACHER.name, base.run_dir / TEACHER.name)
    cfg = load_config(preset, [*base_overrides, f"seed={seed}", f"run.dir={run_dir}"])
    return Step(CACHE, [cfg], after=[TEACHER.step], key=f"{CACHE.step}-seed{seed}")


# -- paths the jobs need ----------------------------------------------------------------


def absolute_paths(preset: str, overrides: list[str]) -> list[str]:
    """Overrides pinning every path the jobs use to where it is from here: the jobs run in
    another directory, and $HOME or $KD_DDP_CACHE may differ on the nodes."""
    cfg = load_config(preset, overrides)
    pins = [f"run.dir={cfg.run_dir.expanduser().resolve()}",
            f"data.cache_dir={cfg.cache_dir.expanduser().resolve()}"]
    if cfg.data.source != "synthetic":
        pins.append(f"data.root={Path(cfg.data.root).expanduser().resolve()}")
    if cfg.slurm.log_dir:
        pins.append(f"slurm.log_dir={Path(cfg.slurm.log_dir).expanduser().resolve()}")
    if cfg.model.python_path:  # a user's model module, imported by every task
        pins.append("model.python_path=" + ",".join(str(Path(d).expanduser().resolve()) for d in cfg.model.python_path))
    if cfg.model.teacher_checkpoint:
        pins.append(f"model.teacher_checkpoint={Path(cfg.model.teacher_checkpoint).expanduser().resolve()}")
    return pins


def log_dir_of(cfg: Config) -> Path:
    return Path(cfg.slurm.log_dir or cfg.run_dir / "slurm").resolve()


def check_paths(cfg: Config, needs_data: bool) -> list[str]:
    """Refuse (ConfigError) what the jobs cannot do without; return warnings for the rest:
    paths on a filesystem only this node sees."""
    from kd_ddp.doctor import node_local
    from kd_ddp.models import check_models
    from kd_ddp.preflight import provisional_classes

    root = Path(cfg.data.root)
    if needs_data and cfg.data.source != "synthetic" and not root.exists():
        raise ConfigError(f"data.root {root} does not exist (the jobs read it at this same path)")
    if needs_data:  # a bad model name, module or output shape: refused here, not in a job hours later
        check_models(cfg, list(stages.ROLES), provisional_classes(cfg))
    if needs_data and cfg.model.teacher_checkpoint and not Path(cfg.model.teacher_checkpoint).is_file():
        raise ConfigError(f"model.teacher_checkpoint {cfg.model.teacher_checkpoint} does not exist")
    if needs_data and cfg.data.loader == "ffcv" and not cfg.slurm.python:
        try:
            import ffcv  # noqa: F401
        except Exception as e:
            raise ConfigError(f"data.loader=ffcv but FFCV does not import in {sys.executable}, the jobs' Python "
                              f"({type(e).__name__}: {e}); install kd-ddp[ffcv] or use data.loader=auto or torch"
                              ) from None
    paths = {"run.dir": cfg.run_dir, "data cache (data.cache_dir)": cfg.cache_dir, "log dir": log_dir_of(cfg)}
    if cfg.data.source != "synthetic":
        paths["data.root"] = root
    if not cfg.slurm.python:
        paths["the jobs' Python"] = Path(sys.executable)
    warnings = []
    for what, path in paths.items():
        fstype = node_local(path)
        if fstype:
            warnings.append(f"{what} {path} is on {fstype}, which only this node sees: jobs on other nodes "
                            "will not find it")
    return warnings


# -- the whole plan ---------------------------------------------------------------------


def plan_submission(kind: str, preset: str, only: str, overrides: list[str], warn: Callable[[str], None]
                    ) -> tuple[Config, list[Step]]:
    """The config and the steps of a `pipeline` (of the steps `only` names, as --stages does)
    or a `sweep` (the grid's axes among `overrides`); ConfigError for a request that makes no
    sense. Warnings about paths the nodes may not see go to `warn`, before a sweep makes its dirs."""
    overrides, grid = split_grid(expand_wildcards(overrides))
    if kind == "pipeline" and grid:
        raise ConfigError(f"{', '.join(grid)}: several values are for `sweep`, not `pipeline`")
    if kind == "sweep" and not grid:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2,... (e.g. kd.alpha=0.1,0.5,0.9)")
    if kind == "sweep" and only != "all":
        raise ConfigError("--stages is for `pipeline` only")
    # Absolute paths: the record and the logs name them, symlinks are made relative to the run
    # dir, and the jobs run elsewhere.
    overrides += absolute_paths(preset, overrides)
    cfg = load_config(preset, overrides)
    keys = parse_stages(only, cfg) if kind == "pipeline" else list(STEPS)
    for warning in check_paths(cfg, needs_data=keys != [REPORT.step]):
        warn(warning)
    if kind == "pipeline":
        return cfg, pipeline_steps(cfg, keys)
    return cfg, sweep_steps(preset, overrides, grid)
