"""Submit the pipeline to Slurm with submitit: one job per stage, chained with dependencies.

    python -m launch.slurm pipeline --preset P [--wait] [--hold] [--stages S,..] [section.field=value ...]
    python -m launch.slurm sweep    --preset P [--wait] kd.alpha=0.1,0.5 kd.temperature=2,4 seed=0,1
    python -m launch.slurm status   RECORD|RUN_DIR [--wait]

`pipeline`: prepare-data -> train-teacher -> cache-logits -> {student-normal, student-kd} -> report.
`sweep`: the same head (one teacher, a logits cache per seed), then every point of the grid as
one job array of KD students in `<run.dir>/sweep/<name>/`, beside one normal student, and a
report that runs once they all ended (afterany) and names the points that did not finish.
`status`: re-attach to a submitted chain through its record: the state of every stage, and
with --wait, follow it as the submitting command would have.
Per-stage resources come from the `slurm.*` config section (`slurm.teacher.tasks_per_node=2`;
`slurm.*.field=value` sets a field for every stage); docs/slurm.md says what each becomes.

Inside a job, every Slurm task is one torch.distributed rank: submitit's
`TorchDistributedEnvironment` exports RANK, WORLD_SIZE, MASTER_ADDR, ... and `run_stage`
joins the group exactly as under torchrun; MASTER_PORT is picked free on the first node by
the job script (launch/ports.py). Jobs are checkpointable: on USR2 (preemption, or
`slurm.signal_delay_s` before the time limit) submitit requeues them, and the stage resumes
from its last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import itertools
import json
import math
import os
import pickle
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from kd_ddp.checkpoint import atomic_write_bytes, atomic_write_json
from kd_ddp.config import Config, ConfigError, StageResources, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
# kd_ddp stage -> its section of SlurmConfig
RESOURCES = {"prepare-data": "prepare_data", "train-teacher": "teacher", "cache-logits": "cache_logits",
             "train-student": "student", "report": "report"}
PIPELINE_STEPS = ("prepare-data", "train-teacher", "cache-logits", "student-normal", "student-kd", "report")
# Sweepable keys change only the KD student: the teacher and the data stay shared.
SWEEPABLE = ("kd.alpha", "kd.temperature", "seed", "kd.teacher", "optim.student_epochs", "optim.student_lr",
             "optim.student_warmup_epochs", "model.student", "model.student_width", "model.student_hidden")
SHORT_NAMES = {"kd.alpha": "a", "kd.temperature": "t", "seed": "s"}
# sacct states of a job that may still complete. PREEMPTED is not one: a job requeued after
# preemption is back in the queue (see settle), one preempted with PreemptMode=CANCEL is over.
WAITING = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "UNKNOWN",
           "READY", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
# squeue reasons of a pending job that say nothing is wrong (yet).
QUIET_REASONS = {"None", "Dependency", "BeginTime", "JobHeldUser"}
REASON_HINTS = {
    "PartitionTimeLimit": "--time is above the partition's MaxTime: lower slurm.<stage>.time_min or change partition",
    "PartitionNodeLimit": "more nodes than the partition allows: lower slurm.<stage>.nodes or change partition",
    "QOSMaxWallDurationPerJobLimit": "--time is above the QOS's limit: lower slurm.<stage>.time_min",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "Resources": "waiting for free resources",
    "Priority": "jobs with higher priority are ahead of it",
    "InvalidAccount": "the account is not valid for this user or partition: check slurm.<stage>.account",
    "InvalidQOS": "the QOS is not valid for this user or partition: check slurm.<stage>.qos",
    "BadConstraints": "no node matches the request (constraint, GPUs, memory)",
}


# -- what runs inside a job -------------------------------------------------------------


class StageJob(submitit.helpers.Checkpointable):
    """One kd_ddp stage in one Slurm task; all tasks of the job form one process group."""

    def __init__(self, config: dict[str, Any], stage: str, mode: str = "kd", gpus: int = 0) -> None:
        self.config = config
        self.stage = stage
        self.mode = mode
        self.gpus = gpus  # GPUs the job asked for on each node; > 0 means train on them or fail

    def __call__(self) -> dict[str, Any]:
        from kd_ddp.cli import run_stage
        from kd_ddp.distributed import joined_a_group
        from kd_ddp.train import Preempted

        # Slurm started the tasks: no torchrun here, the task identity becomes torch's env.
        # CUDA_VISIBLE_DEVICES stays as Slurm set it; kd_ddp maps local rank -> device.
        # MASTER_PORT comes from the job script (launch/ports.py), which export() keeps.
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                      overwrite=True)
        # The host matters once ranks span nodes: it is what a hang or a connection error is traced to.
        print(f"kd-ddp {self.stage}: rank {dist.rank} of world size {dist.world_size} on {socket.gethostname()} "
              f"(local rank {dist.local_rank} of {dist.local_world_size}, "
              f"master {dist.master_addr}:{dist.master_port})", flush=True)
        cfg = from_dict(self.config)
        check_node(cfg, self.stage, self.gpus)
        try:
            result = run_stage(cfg, self.stage, self.mode)
            if joined_a_group():
                atexit.register(end_once_saved, submitit.JobEnvironment().paths.result_pickle)
            return result
        except Preempted as e:
            # SIGTERM: Slurm is ending the job (requeue, preemption, cancel) and the stage has
            # checkpointed mid-epoch. Leave without a result, so submitit records no failure.
            print(f"kd-ddp {self.stage}: {e}", flush=True)
            raise SystemExit(143) from None
        finally:
            print(f"kd-ddp {self.stage}: rank {dist.rank} ran on CPUs {sorted(os.sched_getaffinity(0))} with "
                  f"{torch_threads()} torch threads", flush=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Nothing to save here: every epoch already ends with an atomic checkpoint that
        # run_stage resumes from, so requeueing the same call loses at most one epoch.
        print(f"kd-ddp {self.stage}: interrupted; requeueing, the stage resumes from its last "
              "checkpoint", flush=True)
        return super().checkpoint(*args, **kwargs)


def end_once_saved(result_pickle: Path) -> None:
    """At exit of a task that was in a process group: once submitit has saved its result as a
    success, end the process as `kd_ddp.distributed.end_process` does (it says why), so a
    finished stage does not abort in the interpreter's exit and leave Slurm a failed task. An
    error, or no result, leaves the normal exit and its code."""
    if read_outcome(result_pickle)[0] == "success":
        from kd_ddp.distributed import end_process
        end_process(0)


class _Inert:
    """What every name a result file refers to loads as: it takes any arguments and state
    and does nothing. kd-ddp reads only a result's outcome and an error's text, never the
    value a successful job returned, so no name in the file is ever imported or called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:  # cloudpickle calls what it rebuilt (a type)
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ResultUnpickler(pickle.Unpickler):
    """Reads a submitit result file without running it. submitit writes ("success", the
    job's return value) or ("error", the traceback as text) with cloudpickle, which can
    name any callable (a function pickled by value, too), and a plain pickle.load calls
    what the file names: a crafted file in a log directory would run its code in whoever
    reads the status."""

    def find_class(self, module: str, name: str) -> type[_Inert]:
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a result")


def read_outcome(result_pickle: Path) -> tuple[str, str]:
    """A result file's outcome: ("success", ""), ("error", the traceback text), or
    ("unreadable", why) for a missing or malformed file or one that holds anything but
    what submitit writes."""
    try:
        with open(result_pickle, "rb") as f:
            value = _ResultUnpickler(f).load()
    except OSError as e:
        return "unreadable", f"cannot read {result_pickle}: {e.strerror}"
    except Exception as e:  # a malformed pickle raises many types
        return "unreadable", f"{result_pickle} is not a result file: {type(e).__name__}: {e}"
    if type(value) is tuple and len(value) == 2 and value[0] == "success":
        return "success", ""
    if type(value) is tuple and len(value) == 2 and value[0] == "error" and type(value[1]) is str:
        return "error", value[1]
    return "unreadable", f"{result_pickle} holds neither a success nor an error as submitit writes them"


class SweepReportJob(StageJob):
    """The sweep's report, run once every point ended (afterany): it names the points that
    have no finished KD student in report.md and results.json (`sweep_missing`)."""

    def __init__(self, config: dict[str, Any], points: dict[str, str]) -> None:
        super().__init__(config, "report")
        self.points = points  # name -> run dir

    def __call__(self) -> dict[str, Any]:
        result = super().__call__()
        missing = [n for n, d in self.points.items() if not (Path(d) / "student-kd" / "summary.json").is_file()]
        note_missing_points(Path(self.config["run"]["dir"]) / "report", missing)
        return {**result, "sweep_missing": missing}


def note_missing_points(report_dir: Path, missing: list[str]) -> None:
    results_path = report_dir / "results.json"
    results = json.loads(results_path.read_text())
    results["sweep_missing"] = missing
    atomic_write_json(results_path, results)
    if missing:
        text = (report_dir / "report.md").read_text()
        text += ("\n## Sweep points without a result\n\nThese points of the grid have no finished KD student "
                 "(their job failed or was cancelled; `launch.slurm status` names the job and its log): "
                 + ", ".join(f"`{n}`" for n in missing) + ".\n")
        atomic_write_bytes(report_dir / "report.md", text.encode())


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def check_node(cfg: Config, stage: str, gpus: int) -> None:
    """Refuse, naming the stage and the node, what would otherwise fail late or silently: a
    job that asked for GPUs but sees none (it would train for hours on the CPU), FFCV that
    does not import where data.loader=ffcv needs it (a traceback when the loader starts)."""
    import torch

    from kd_ddp.distributed import cuda_visibility

    host = socket.gethostname()
    if gpus and not torch.cuda.is_available():
        raise ConfigError(f"stage {stage}: the job asked Slurm for {gpus} GPU(s) per node "
                          f"(slurm.{RESOURCES[stage]}) but torch sees no CUDA device on {host} ({cuda_visibility()}); "
                          "check the GPU request for this partition, and that the job's Python has a CUDA "
                          "build of torch")
    if cfg.data.loader == "ffcv" and stage != "report":
        try:
            import ffcv  # noqa: F401
        except Exception as e:
            raise ConfigError(f"stage {stage}: data.loader=ffcv but FFCV does not import on {host} "
                              f"({sys.executable}: {type(e).__name__}: {e}); install kd-ddp[ffcv] in the "
                              "job's environment or use data.loader=torch") from None


# -- the plan: which jobs, with which configs and dependencies --------------------------


@dataclass
class Step:
    key: str  # unique name of the job within one submission
    stage: str  # kd_ddp stage it runs
    configs: list[Config]  # one = a plain job, several = a job array
    mode: str = "kd"
    after: list[str] = field(default_factory=list)  # keys of the steps it waits for (afterok)
    names: list[str] = field(default_factory=list)  # sweep point names, one per array task
    after_any: list[str] = field(default_factory=list)  # keys of steps it waits to end, however (afterany)
    points: dict[str, str] = field(default_factory=dict)  # sweep report: point name -> its run dir

    @property
    def resources(self) -> StageResources:
        return getattr(self.configs[0].slurm, RESOURCES[self.stage])


def pipeline_steps(cfg: Config, only: Iterable[str] = PIPELINE_STEPS) -> list[Step]:
    cached = cfg.kd.teacher == "cached"
    students_after = ["cache-logits"] if cached else ["train-teacher"]
    steps = [Step("prepare-data", "prepare-data", [cfg]),
             Step("train-teacher", "train-teacher", [cfg], after=["prepare-data"]),
             *([Step("cache-logits", "cache-logits", [cfg], after=["train-teacher"])] if cached else []),
             Step("student-normal", "train-student", [cfg], mode="normal", after=students_after),
             Step("student-kd", "train-student", [cfg], mode="kd", after=students_after),
             Step("report", "report", [cfg], after=["student-normal", "student-kd"])]
    return select_steps(steps, set(only))


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


def parse_stages(text: str) -> list[str]:
    if text == "all":
        return list(PIPELINE_STEPS)
    wanted: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        expanded = ["student-normal", "student-kd"] if name == "train-student" else [name]
        for key in expanded:
            if key not in PIPELINE_STEPS:
                raise ConfigError(f"--stages: unknown stage {name!r}; stages: {', '.join(PIPELINE_STEPS)}, "
                                  "train-student (= both students)")
            wanted.append(key)
    return wanted


def expand_wildcards(overrides: list[str]) -> list[str]:
    """`slurm.*.field=v` -> the same override for every stage's resources."""
    stages = list(Config().slurm.stages())
    out: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.strip().startswith("slurm.*."):
            out += [f"slurm.{stage}.{key.strip()[len('slurm.*.'):]}{sep}{value}" for stage in stages]
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
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points with the same name: {', '.join(sorted(names))}")
    caches: dict[int, Step] = {}
    configs: list[Config] = []
    for point, name in zip(points, names):
        cfg = load_config(preset, [*base_overrides, *(f"{k}={v}" for k, v in point.items()),
                                   f"run.dir={base.run_dir / 'sweep' / name}"])
        link(cfg.run_dir / "teacher", base.run_dir / "teacher")
        if cfg.kd.teacher == "cached":
            caches.setdefault(cfg.seed, cache_step(preset, base_overrides, base, cfg.seed))
            link(cfg.run_dir / "teacher-logits", caches[cfg.seed].configs[0].run_dir / "teacher-logits")
        configs.append(cfg)
    # As in the pipeline, the students wait for the caches: then no two jobs of the sweep
    # ever work in the same run dir at once.
    heads = [s.key for s in caches.values()] or ["train-teacher"]
    # The report waits for every student to end, completed or not (afterany), but only runs
    # once the teacher and the caches succeeded (afterok): a failed point leaves a hole in the
    # grid, which the report names, not a sweep without a report.
    return [*pipeline_steps(base, ["prepare-data", "train-teacher"]), *caches.values(),
            Step("student-normal", "train-student", [base], mode="normal", after=heads),
            Step("student-kd", "train-student", configs, mode="kd", after=heads, names=names),
            Step("report", "report", [base], after=heads, after_any=["student-normal", "student-kd"],
                 points={n: str(c.run_dir) for n, c in zip(names, configs)})]


def cache_step(preset: str, base_overrides: list[str], base: Config, seed: int) -> Step:
    if seed == base.seed:
        return Step("cache-logits", "cache-logits", [base], after=["train-teacher"])
    run_dir = base.run_dir / "sweep-caches" / f"seed{seed}"
    link(run_dir / "teacher", base.run_dir / "teacher")
    cfg = load_config(preset, [*base_overrides, f"seed={seed}", f"run.dir={run_dir}"])
    return Step(f"cache-logits-seed{seed}", "cache-logits", [cfg], after=["train-teacher"])


# -- submission -------------------------------------------------------------------------


@dataclass
class Submitted:
    step: Step
    jobs: list[submitit.SlurmJob]
    depends_on: list[str]  # job ids it waits for (afterok)
    depends_on_any: list[str] = field(default_factory=list)  # job ids it waits to end (afterany)

    @property
    def job_id(self) -> str:
        """The id others depend on: for an array, the array's (afterok waits for every task)."""
        return self.jobs[0].job_id.split("_")[0] if self.step.names else self.jobs[0].job_id

    def label(self, i: int) -> str:
        return f"{self.step.key}[{self.step.names[i]}]" if self.step.names else self.step.key

    def log(self, i: int) -> Path:
        return self.jobs[i].paths.stdout


def dependency(after_ok: list[str], after_any: list[str]) -> str:
    parts = [f"{kind}:{':'.join(ids)}" for kind, ids in (("afterok", after_ok), ("afterany", after_any)) if ids]
    return ",".join(parts)


def python_command(cfg: Config) -> str:
    """What starts Python in the tasks: slurm.python, else this interpreter (submitit's default)."""
    return cfg.slurm.python or shlex.quote(sys.executable)


def job_script_setup(cfg: Config, res: StageResources) -> list[str]:
    """Lines the job script runs on the job's first node before srun starts the tasks, which
    inherit the environment they export."""
    lines = []
    if (ROOT / "pyproject.toml").is_file():  # a source checkout: make it importable in the job
        lines.append(f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
    lines += [line for line in cfg.slurm.setup.splitlines() if line.strip()]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in cfg.slurm.env_vars().items()]
    if res.world_size > 1:  # rank 0 listens on this node: pick its port here
        # tail: a wrapper (slurm.python: a container, a shell) may print before Python does
        lines += [f'MASTER_PORT=$({python_command(cfg)} -m launch.ports "$SLURM_JOB_ID" | tail -n 1)',
                  'case $MASTER_PORT in ""|*[!0-9]*) unset MASTER_PORT; echo "launch.ports failed: submitit derives '
                  'a port from the job id" >&2 ;; *) export MASTER_PORT ;; esac']
    return lines


def executor(step: Step, log_dir: Path, after_ok: list[str], after_any: list[str], hold: bool
             ) -> submitit.SlurmExecutor:
    cfg, res = step.configs[0], step.resources
    ex = submitit.SlurmExecutor(folder=log_dir / "%j", max_num_timeout=cfg.slurm.max_timeouts,
                                python=cfg.slurm.python or None)
    # kill-on-invalid-dep: a failed parent cancels this job even where the cluster does not
    # set DependencyParameters=kill_invalid_depend; requeue: preemption requeues, not kills;
    # ntasks: Slurm 23.11 refuses --gpus-per-task without it.
    additional: dict[str, Any] = {"kill-on-invalid-dep": "yes", "requeue": True, "ntasks": res.world_size}
    gpus = res.gpu_request()
    if gpus:
        additional[gpus[0]] = gpus[1]
    if res.gpu_bind:
        additional["gpu-bind"] = res.gpu_bind
    additional.update(res.extra_options())
    if hold:
        additional["hold"] = True
    params: dict[str, Any] = {
        "job_name": f"kd-{step.key}", "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "time": res.time_min, "signal_delay_s": cfg.slurm.signal_delay_s,
        "stderr_to_stdout": True, "array_parallelism": cfg.slurm.array_parallelism,
        # srun of Slurm 22.05-23.02 ignores the job's --cpus-per-task: without it here every task
        # would be bound to one CPU under task/affinity.
        "srun_args": [f"--cpus-per-task={res.cpus_per_task}", *shlex.split(cfg.slurm.srun_args)],
        "setup": job_script_setup(cfg, res), "wckey": cfg.slurm.wckey or None,
        "additional_parameters": additional,
    }
    optional = {"partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint,
                "mem": f"{math.ceil(res.mem_gb * 1024)}M" if res.mem_gb else ""}
    params.update({k: v for k, v in optional.items() if v})
    if after_ok or after_any:
        params["dependency"] = dependency(after_ok, after_any)
    ex.update_parameters(**params)
    return ex


def job_config(cfg: Config, gpus: int) -> dict[str, Any]:
    """The config a job runs with: a stage that asked for GPUs trains on them or fails, it never
    falls back to the CPU (train.device=auto becomes cuda)."""
    values = cfg.to_dict()
    if gpus and values["train"]["device"] == "auto":
        values["train"]["device"] = "cuda"
    return values


def stage_job(step: Step, cfg: Config) -> StageJob:
    gpus = step.resources.gpus_on_node()
    if step.points:
        return SweepReportJob(job_config(cfg, gpus), step.points)
    return StageJob(job_config(cfg, gpus), step.stage, step.mode, gpus)


def submit_step(step: Step, log_dir: Path, after_ok: list[str], after_any: list[str], hold: bool
                ) -> list[submitit.SlurmJob]:
    ex = executor(step, log_dir, after_ok, after_any, hold)
    if not step.names:
        return [ex.submit(stage_job(step, step.configs[0]))]
    with ex.batch():  # one job array
        jobs = [ex.submit(stage_job(step, c)) for c in step.configs]
    return jobs


class SubmissionError(RuntimeError):
    """sbatch refused a job; the jobs of the chain submitted before it are cancelled."""


def submit(steps: list[Step], log_dir: Path, hold: bool = False) -> list[Submitted]:
    """Submit the whole chain at once: a dependency on a job slurmctld already forgot counts
    as satisfied, so children must be queued while their parents are still known."""
    done: dict[str, Submitted] = {}
    step = steps[0]
    try:
        for step in steps:
            ok, any_ = [done[k].job_id for k in step.after], [done[k].job_id for k in step.after_any]
            jobs = submit_step(step, log_dir, ok, any_, hold and not (ok or any_))
            done[step.key] = Submitted(step, jobs, ok, any_)
    except BaseException as e:
        cancel([s.job_id for s in done.values()])  # no half chain left in the queue
        if isinstance(e, FailedJobError | FailedSubmissionError | OSError | subprocess.SubprocessError):
            raise SubmissionError(f"submitting {step.key} (slurm.{RESOURCES[step.stage]}) failed, nothing is "
                                  f"left queued:\n{str(e).strip()}") from None
        raise
    return list(done.values())


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False, timeout=60)


def write_record(kind: str, cfg: Config, subs: list[Submitted], log_dir: Path) -> Path:
    """A JSON record of the submission: job ids, dependencies and logs; `status` re-attaches
    to the chain through it."""
    record = {
        "kind": kind, "preset": cfg.preset, "run_dir": str(cfg.run_dir), "log_dir": str(log_dir),
        "report": str(cfg.run_dir / "report" / "report.md"),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": [{"key": s.step.key, "stage": s.step.stage, "mode": s.step.mode, "job_id": s.job_id,
                  "depends_on": s.depends_on, "depends_on_any": s.depends_on_any,
                  "after": s.step.after, "after_any": s.step.after_any, "log": str(s.log(0)),
                  "tasks": s.step.resources.world_size,
                  "array": [{"name": n, "job_id": s.jobs[i].job_id, "log": str(s.log(i)),
                             "run_dir": str(s.step.configs[i].run_dir)} for i, n in enumerate(s.step.names)]}
                 for s in subs],
    }
    path = log_dir / f"{kind}-{subs[0].job_id}.json"
    atomic_write_json(path, record)  # whoever polls for it never reads half of it
    return path


def print_submission(subs: list[Submitted], record: Path, hold: bool) -> None:
    for s in subs:
        deps = dependency(s.depends_on, s.depends_on_any) or "-"
        res = s.step.resources
        shape = f"{res.nodes}x{res.tasks_per_node} task(s)"
        what = f"array of {len(s.jobs)}" if s.step.names else shape
        print(f"{s.step.key:<24} job {s.job_id:<10} {deps:<28} {what:<16} log {s.log(0)}")
        for i, name in enumerate(s.step.names):
            print(f"  {name:<22} job {s.jobs[i].job_id:<10} run {s.step.configs[i].run_dir}")
    print(f"record: {record}  (follow it later: python -m launch.slurm status {record} --wait)")
    if hold:
        held = [s.job_id for s in subs if not (s.depends_on or s.depends_on_any)]
        print(f"held: start the chain with `scontrol release {' '.join(held)}`")
    print(f"cancel: scancel {' '.join(s.job_id for s in subs)}", flush=True)


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
    from kd_ddp.train import provisional_classes

    root = Path(cfg.data.root)
    if needs_data and cfg.data.source != "synthetic" and not root.exists():
        raise ConfigError(f"data.root {root} does not exist (the jobs read it at this same path)")
    if needs_data:  # a bad model name, module or output shape: refused here, not in a job hours later
        check_models(cfg, ["teacher", "student"], provisional_classes(cfg))
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


# -- waiting ----------------------------------------------------------------------------


@dataclass
class Tracked:
    """One job of a submitted chain (an array task counts as one), as its record has it."""

    key: str  # the step
    label: str
    job: submitit.SlurmJob
    log: Path
    tasks: int

    @property
    def job_id(self) -> str:
        return self.job.job_id


def tracked_jobs(record: dict[str, Any]) -> list[Tracked]:
    folder = Path(record["log_dir"]) / "%j"
    out = []
    for j in record["jobs"]:
        entries = [(f"{j['key']}[{a['name']}]", a["job_id"], a["log"]) for a in j["array"]] or [
            (j["key"], j["job_id"], j["log"])]
        out += [Tracked(j["key"], label, submitit.SlurmJob(folder=folder, job_id=job_id, tasks=range(j["tasks"])),
                        Path(log), j["tasks"]) for label, job_id, log in entries]
    return out


def sacct_states(tracked: list[Tracked]) -> dict[str, str]:
    """State of every job (array tasks one by one), from one sacct call."""
    watcher = submitit.SlurmJob.watcher
    for t in tracked:
        watcher.register_job(t.job_id)
    watcher.update()
    return {t.job_id: (watcher.get_state(t.job_id, mode="cache") or "UNKNOWN").split()[0] for t in tracked}


def queue_info(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) of the jobs slurmctld still holds, from one squeue call."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                         capture_output=True, text=True, check=False, timeout=60)
    if out.returncode:  # every job already forgotten (MinJobAge) gives "Invalid job id"
        return {}
    rows = (line.split("|", 2) for line in out.stdout.splitlines() if line.count("|") == 2)
    return {job_id: (state, reason) for job_id, state, reason in rows}


def settle(sacct_state: str, queued: tuple[str, str] | None) -> str:
    """sacct says PREEMPTED both for a job that Slurm requeued and one it cancelled; only the
    queue tells them apart: a requeued job is back in it."""
    if sacct_state == "PREEMPTED" and queued and queued[0] in WAITING:
        return queued[0]
    return sacct_state


def job_states(tracked: list[Tracked]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    queue = queue_info([t.job_id for t in tracked])
    states = {job_id: settle(state, queue.get(job_id)) for job_id, state in sacct_states(tracked).items()}
    return states, queue


def job_error(job: submitit.SlurmJob) -> str:
    """The last line of the Python error a task reported, or "" when none did."""
    for t in range(job.num_tasks):
        path = job.task(t).paths.result_pickle
        if path.is_file():
            outcome, text = read_outcome(path)
            if outcome == "error":
                lines = [ln for ln in text.splitlines() if ln.strip()]
                return lines[-1] if lines else "error"
            if outcome == "unreadable":
                return f"unreadable result: {text}"
    return ""


def doomed(failed: set[str], steps: dict[str, dict[str, Any]]) -> set[str]:
    """Steps that can no longer run: afterok on a failed step, or on one of these (the
    record lists the steps in submission order, which is topological)."""
    out: set[str] = set()
    for key, job in steps.items():
        if set(job["after"]) & (failed | out):
            out.add(key)
    return out


def report_failure(t: Tracked, state: str, cancelled: list[dict[str, Any]]) -> None:
    error = job_error(t.job)
    what = state
    if state == "PREEMPTED":
        what += " (preempted and not requeued: the partition's PreemptMode cancels)"
    lines = [f"launch.slurm: stage {t.label} failed: job {t.job_id} is {what}"]
    if error:
        lines.append(f"  error: {error}")
    lines.append(f"  log:   {t.log}")
    if t.tasks > 1:
        lines.append(f"         (other ranks: {t.log.name.replace('_0_log', '_<rank>_log')})")
    if cancelled:
        lines.append("  cancelled the jobs that depend on it: "
                     + ", ".join(f"{j['key']} ({j['job_id']})" for j in cancelled))
    print("\n".join(lines), file=sys.stderr, flush=True)


class PendingNotices:
    """Says why a job is still pending once it has been for `after_s` (once per reason)."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.since: dict[str, float] = {}
        self.said: set[tuple[str, str]] = set()

    def check(self, tracked: list[Tracked], queue: dict[str, tuple[str, str]]) -> None:
        now = time.monotonic()
        for t in tracked:
            state, reason = queue.get(t.job_id, ("", ""))
            if state != "PENDING" or reason in QUIET_REASONS:
                self.since.pop(t.job_id, None)
                continue
            waited = now - self.since.setdefault(t.job_id, now)
            if waited >= self.after_s and (t.job_id, reason) not in self.said:
                self.said.add((t.job_id, reason))
                hint = next((h for k, h in REASON_HINTS.items() if reason.startswith(k)), "")
                print(f"{time.strftime('%H:%M:%S')} {t.label:<32} job {t.job_id:<10} pending for {waited:.0f} s: "
                      f"{reason}" + (f" ({hint})" if hint else ""), flush=True)


def wait(record: dict[str, Any], poll_s: float, notice_s: float) -> dict[str, str]:
    """Follow the jobs until every one has ended; return their final states. A failed job is
    named with its error and log, and the jobs that can no longer run because of it are
    cancelled; jobs that wait for it with afterany (the sweep's report) run on."""
    tracked = tracked_jobs(record)
    steps = {j["key"]: j for j in record["jobs"]}
    shown: dict[str, str] = {}
    handled: set[str] = set()
    failed: set[str] = set()
    notices = PendingNotices(notice_s)
    while True:
        states, queue = job_states(tracked)
        for t in tracked:
            if shown.get(t.job_id, "UNKNOWN") != states[t.job_id]:  # UNKNOWN: not in sacct yet
                shown[t.job_id] = states[t.job_id]
                print(f"{time.strftime('%H:%M:%S')} {t.label:<32} job {t.job_id:<10} {states[t.job_id]}", flush=True)
        for t in tracked:  # submission order: a parent's failure is seen before its children's
            state = states[t.job_id]
            if state in WAITING or state == "COMPLETED" or t.job_id in handled:
                continue
            handled.add(t.job_id)
            before = doomed(failed, steps)
            if t.key in before:
                continue  # cancelled because a parent failed, which was reported
            failed.add(t.key)
            victims = [steps[k] for k in steps if k in doomed(failed, steps) - before]
            cancel([v["job_id"] for v in victims])  # kill_invalid_depend does it too, where the cluster has it
            report_failure(t, state, victims)
        notices.check(tracked, queue)
        if all(state not in WAITING for state in states.values()):
            return {t.label: states[t.job_id] for t in tracked}
        time.sleep(poll_s)


def finish(record: dict[str, Any], states: dict[str, str]) -> int:
    """The closing line: where the report is, and whether everything completed (0) or not (1)."""
    report = Path(record.get("report") or Path(record["run_dir"]) / "report" / "report.md")
    not_done = [label for label, state in states.items() if state != "COMPLETED"]
    if not not_done:
        print(f"{record['kind']} finished: report in {report}", flush=True)
        return 0
    report_state = states.get("report")
    if report_state == "COMPLETED":
        print(f"{record['kind']} ended with {len(not_done)} job(s) that did not complete ({', '.join(not_done)}); "
              f"report of the rest in {report}", flush=True)
    else:
        print(f"{record['kind']} did not complete ({', '.join(not_done)}); no report", flush=True)
    return 1


# -- status: re-attach to a chain -------------------------------------------------------


def find_record(path: Path) -> Path:
    """A record file, or the newest record in a run dir or log dir."""
    if path.is_file():
        return path
    found = [p for d in (path, path / "slurm") for kind in ("pipeline", "sweep") for p in d.glob(f"{kind}-*.json")]
    if not found:
        raise ConfigError(f"no launch.slurm record at {path} (a pipeline-<id>.json or sweep-<id>.json, "
                          "or a run dir or log dir holding one)")
    return max(found, key=lambda p: p.stat().st_mtime)


def show_status(record: dict[str, Any]) -> int:
    """One line per job: its state (with the queue's reason while pending) and log; 0 when all
    completed, 1 when one did not, 3 while some are still queued or running."""
    tracked = tracked_jobs(record)
    states, queue = job_states(tracked)
    for t in tracked:
        state = states[t.job_id]
        reason = queue.get(t.job_id, ("", ""))[1]
        shown = f"{state} ({reason})" if state == "PENDING" and reason not in ("", "None") else state
        print(f"{t.label:<32} job {t.job_id:<10} {shown:<28} log {t.log}")
    if any(state in WAITING for state in states.values()):
        print(f"{record['kind']} in progress; report to come in {record.get('report')}", flush=True)
        return 3
    return finish(record, {t.label: states[t.job_id] for t in tracked})


# -- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("pipeline", "sweep", "status"))
    p.add_argument("--preset", default="quick", help="smoke | quick | seed (default: quick)")
    p.add_argument("--wait", action="store_true", help="follow the jobs; exit 1 naming the stage that failed")
    p.add_argument("--hold", action="store_true", help="submit the chain held (start it with scontrol release)")
    p.add_argument("--stages", default="all", help="pipeline only: comma-separated subset of "
                   f"{','.join(PIPELINE_STEPS)} (train-student = both students); default all")
    p.add_argument("--poll-s", type=float, default=10.0, help="--wait: seconds between sacct calls")
    p.add_argument("--pending-notice-s", type=float, default=300.0,
                   help="--wait: print why a job is pending once it has been for this long (default 300)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides; for status: the record (or the run dir)")
    return p.parse_intermixed_args(argv)


def plan(args: argparse.Namespace) -> tuple[Config, list[Step]]:
    overrides, grid = split_grid(expand_wildcards(args.overrides))
    if args.command == "pipeline" and grid:
        raise ConfigError(f"{', '.join(grid)}: several values are for `sweep`, not `pipeline`")
    if args.command == "sweep" and not grid:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2,... (e.g. kd.alpha=0.1,0.5,0.9)")
    if args.command == "sweep" and args.stages != "all":
        raise ConfigError("--stages is for `pipeline` only")
    # Absolute paths: the record and the logs name them, symlinks are made relative to the run
    # dir, and the jobs run elsewhere.
    overrides += absolute_paths(args.preset, overrides)
    cfg = load_config(args.preset, overrides)
    stages = parse_stages(args.stages) if args.command == "pipeline" else list(PIPELINE_STEPS)
    for warning in check_paths(cfg, needs_data=stages != ["report"]):  # before a sweep makes its dirs
        print(f"launch.slurm: warning: {warning}", file=sys.stderr)
    if args.command == "pipeline":
        return cfg, pipeline_steps(cfg, stages)
    return cfg, sweep_steps(args.preset, overrides, grid)


def follow(record: dict[str, Any], args: argparse.Namespace, record_path: Path) -> int:
    try:
        states = wait(record, args.poll_s, args.pending_notice_s)
    except KeyboardInterrupt:
        print(f"launch.slurm: stopped waiting; the jobs keep running (`python -m launch.slurm status {record_path} "
              "--wait` follows them again)", file=sys.stderr)
        return 130
    return finish(record, states)


def status_command(args: argparse.Namespace) -> int:
    if len(args.overrides) != 1:
        print("launch.slurm: error: status takes one record (or run dir)", file=sys.stderr)
        return 2
    try:
        path = find_record(Path(args.overrides[0]))
        record = json.loads(path.read_text())
    except (ConfigError, OSError, ValueError) as e:
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 2
    print(f"record: {path}")
    return follow(record, args, path) if args.wait else show_status(record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "status":
        return status_command(args)
    try:
        cfg, steps = plan(args)
        log_dir = log_dir_of(cfg)
        log_dir.mkdir(parents=True, exist_ok=True)
        subs = submit(steps, log_dir, hold=args.hold)
    except (ConfigError, SubmissionError, OSError) as e:  # OSError: the log or run dir is not writable
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 2
    record_path = write_record(args.command, cfg, subs, log_dir)
    print_submission(subs, record_path, args.hold)
    if not args.wait:
        return 0
    return follow(json.loads(record_path.read_text()), args, record_path)


if __name__ == "__main__":
    # Run the importable module, not __main__: submitit pickles StageJob by reference, and a
    # class of __main__ could not be found again inside the job.
    from launch.slurm import main as _main

    sys.exit(_main())
