"""Submit the pipeline to Slurm with submitit: one job per stage, chained with `afterok`.

    python -m launch.slurm pipeline --preset P [--wait] [--hold] [--stages S,..] [section.field=value ...]
    python -m launch.slurm sweep    --preset P [--wait] kd.alpha=0.1,0.5 kd.temperature=2,4 seed=0,1

`pipeline`: prepare-data -> train-teacher -> cache-logits -> {student-normal, student-kd} -> report.
`sweep`: the same head (one teacher, a logits cache per seed), then every point of the grid as
one job array of KD students in `<run.dir>/sweep/<name>/`, beside one normal student, and a
report that waits for all of them. Per-stage resources come from the `slurm.*` config section
(`slurm.teacher.tasks_per_node=2`; `slurm.*.field=value` sets a field for every stage).

Inside a job, every Slurm task is one torch.distributed rank: submitit's
`TorchDistributedEnvironment` exports RANK, WORLD_SIZE, MASTER_ADDR, ... and `run_stage`
joins the group exactly as under torchrun. Jobs are checkpointable: on USR2 (preemption, or
`slurm.signal_delay_s` before the time limit) submitit requeues them, and the stage resumes
from its last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, pickle_load

from kd_ddp.checkpoint import atomic_write_json
from kd_ddp.config import Config, ConfigError, StageResources, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
# kd_ddp stage -> its section of SlurmConfig
RESOURCES = {"prepare-data": "prepare_data", "train-teacher": "teacher", "cache-logits": "cache_logits",
             "train-student": "student", "report": "report"}
PIPELINE_STEPS = ("prepare-data", "train-teacher", "cache-logits", "student-normal", "student-kd", "report")
# Sweepable keys change only the KD student: the teacher and the data stay shared.
SWEEPABLE = ("kd.alpha", "kd.temperature", "seed", "kd.teacher", "optim.student_epochs", "optim.student_lr",
             "model.student", "model.student_width", "model.student_hidden")
SHORT_NAMES = {"kd.alpha": "a", "kd.temperature": "t", "seed": "s"}
WAITING = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED",
           "PREEMPTED", "UNKNOWN", "READY"}


# -- what runs inside a job -------------------------------------------------------------


class StageJob(submitit.helpers.Checkpointable):
    """One kd_ddp stage in one Slurm task; all tasks of the job form one process group."""

    def __init__(self, config: dict[str, Any], stage: str, mode: str = "kd") -> None:
        self.config = config
        self.stage = stage
        self.mode = mode

    def __call__(self) -> dict[str, Any]:
        from kd_ddp.cli import run_stage
        from kd_ddp.train import Preempted

        # Slurm started the tasks: no torchrun here, the task identity becomes torch's env.
        # CUDA_VISIBLE_DEVICES stays as Slurm set it; kd_ddp maps local rank -> device.
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                      overwrite=True)
        # The host matters once ranks span nodes: it is what a hang or a connection error is traced to.
        print(f"kd-ddp {self.stage}: rank {dist.rank} of world size {dist.world_size} on {socket.gethostname()} "
              f"(local rank {dist.local_rank} of {dist.local_world_size}, "
              f"master {dist.master_addr}:{dist.master_port})", flush=True)
        cfg = from_dict(self.config)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cfg.train.threads == 0 and cpus:
            # Without CPU binding (task/none) every task would see, and use, all cores.
            cfg.train.threads = int(cpus)
        try:
            return run_stage(cfg, self.stage, self.mode)
        except Preempted as e:
            # SIGTERM: Slurm is ending the job (requeue, preemption, cancel) and the stage has
            # checkpointed mid-epoch. Leave without a result, so submitit records no failure.
            print(f"kd-ddp {self.stage}: {e}", flush=True)
            raise SystemExit(143) from None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Nothing to save here: every epoch already ends with an atomic checkpoint that
        # run_stage resumes from, so requeueing the same call loses at most one epoch.
        print(f"kd-ddp {self.stage}: interrupted; requeueing, the stage resumes from its last "
              "checkpoint", flush=True)
        return super().checkpoint(*args, **kwargs)


# -- the plan: which jobs, with which configs and dependencies --------------------------


@dataclass
class Step:
    key: str  # unique name of the job within one submission
    stage: str  # kd_ddp stage it runs
    configs: list[Config]  # one = a plain job, several = a job array
    mode: str = "kd"
    after: list[str] = field(default_factory=list)  # keys of the steps it waits for (afterok)
    names: list[str] = field(default_factory=list)  # sweep point names, one per array task

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
    """Separate `key=v1,v2,...` sweep axes from plain overrides (list-valued keys keep their commas)."""
    default = Config()
    base: list[str] = []
    grid: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        try:
            is_list = isinstance(functools.reduce(getattr, key.split("."), default), list)
        except AttributeError:  # unknown key: load_config says so, with a suggestion
            is_list = True
        if not sep or "," not in text or is_list:
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
    return [*pipeline_steps(base, ["prepare-data", "train-teacher"]), *caches.values(),
            Step("student-normal", "train-student", [base], mode="normal", after=heads),
            Step("student-kd", "train-student", configs, mode="kd", after=heads, names=names),
            Step("report", "report", [base], after=["student-normal", "student-kd"])]


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
    depends_on: list[str]

    @property
    def job_id(self) -> str:
        """The id others depend on: for an array, the array's (afterok waits for every task)."""
        return self.jobs[0].job_id.split("_")[0] if self.step.names else self.jobs[0].job_id

    def label(self, i: int) -> str:
        return f"{self.step.key}[{self.step.names[i]}]" if self.step.names else self.step.key

    def log(self, i: int) -> Path:
        return self.jobs[i].paths.stdout


def extra_flags(items: list[str]) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        flags[key.strip().lstrip("-")] = value.strip() if sep else True
    return flags


def executor(step: Step, log_dir: Path, depends_on: list[str], hold: bool) -> submitit.SlurmExecutor:
    cfg, res = step.configs[0], step.resources
    ex = submitit.SlurmExecutor(folder=log_dir / "%j", max_num_timeout=cfg.slurm.max_timeouts)
    # kill-on-invalid-dep: a failed parent cancels this job even where the cluster does not
    # set DependencyParameters=kill_invalid_depend; requeue: preemption requeues, not kills.
    additional: dict[str, Any] = {"kill-on-invalid-dep": "yes", "requeue": True, **extra_flags(res.extra)}
    if hold:
        additional["hold"] = True
    params: dict[str, Any] = {
        "job_name": f"kd-{step.key}", "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "time": res.time_min, "signal_delay_s": cfg.slurm.signal_delay_s,
        "stderr_to_stdout": True, "array_parallelism": cfg.slurm.array_parallelism,
        "additional_parameters": additional,
    }
    optional = {"partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint,
                "gpus_per_task": res.gpus_per_task, "mem": f"{math.ceil(res.mem_gb * 1024)}M" if res.mem_gb else ""}
    params.update({k: v for k, v in optional.items() if v})
    if depends_on:
        params["dependency"] = "afterok:" + ":".join(depends_on)
    if (ROOT / "pyproject.toml").is_file():  # a source checkout: make it importable in the job
        params["setup"] = [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    ex.update_parameters(**params)
    return ex


def submit_step(step: Step, log_dir: Path, depends_on: list[str], hold: bool) -> list[submitit.SlurmJob]:
    ex = executor(step, log_dir, depends_on, hold)
    if not step.names:
        return [ex.submit(StageJob(step.configs[0].to_dict(), step.stage, step.mode))]
    with ex.batch():  # one job array
        jobs = [ex.submit(StageJob(c.to_dict(), step.stage, step.mode)) for c in step.configs]
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
            deps = [done[k].job_id for k in step.after]
            jobs = submit_step(step, log_dir, deps, hold and not deps)
            done[step.key] = Submitted(step, jobs, deps)
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
    """A JSON record of the submission: job ids, dependencies and logs (for people and tests)."""
    record = {
        "kind": kind, "preset": cfg.preset, "run_dir": str(cfg.run_dir), "log_dir": str(log_dir),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": [{"key": s.step.key, "stage": s.step.stage, "mode": s.step.mode, "job_id": s.job_id,
                  "depends_on": s.depends_on, "log": str(s.log(0)),
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
        deps = f"afterok:{':'.join(s.depends_on)}" if s.depends_on else "-"
        res = s.step.resources
        shape = f"{res.nodes}x{res.tasks_per_node} task(s)"
        what = f"array of {len(s.jobs)}" if s.step.names else shape
        print(f"{s.step.key:<24} job {s.job_id:<10} {deps:<28} {what:<16} log {s.log(0)}")
        for i, name in enumerate(s.step.names):
            print(f"  {name:<22} job {s.jobs[i].job_id:<10} run {s.step.configs[i].run_dir}")
    print(f"record: {record}")
    if hold:
        held = [s.job_id for s in subs if not s.depends_on]
        print(f"held: start the chain with `scontrol release {' '.join(held)}`")
    print(f"cancel: scancel {' '.join(s.job_id for s in subs)}", flush=True)


# -- waiting ----------------------------------------------------------------------------


def job_states(subs: list[Submitted]) -> dict[str, str]:
    """State of every job (array tasks one by one), from one sacct call."""
    watcher = subs[0].jobs[0].watcher
    watcher.update()
    return {j.job_id: (watcher.get_state(j.job_id, mode="cache") or "UNKNOWN").split()[0]
            for s in subs for j in s.jobs}


def job_error(job: submitit.SlurmJob) -> str:
    """The last line of the Python error a task reported, or "" when none did."""
    for t in range(job.num_tasks):
        path = job.task(t).paths.result_pickle
        if path.is_file():
            outcome, payload = pickle_load(path)
            if outcome == "error":
                lines = [ln for ln in str(payload).splitlines() if ln.strip()]
                return lines[-1] if lines else "error"
    return ""


def dependents(subs: list[Submitted], key: str) -> list[Submitted]:
    out: list[Submitted] = []
    frontier = {key}
    for s in subs:  # submission order is topological
        if frontier & set(s.step.after):
            out.append(s)
            frontier.add(s.step.key)
    return out


def report_failure(subs: list[Submitted], failed: Submitted, i: int, state: str) -> None:
    job = failed.jobs[i]
    error = job_error(job)
    down = dependents(subs, failed.step.key)
    cancel([s.job_id for s in down])  # kill_invalid_depend does it too, where the cluster has it
    lines = [f"launch.slurm: stage {failed.label(i)} failed: job {job.job_id} is {state}"]
    if error:
        lines.append(f"  error: {error}")
    lines.append(f"  log:   {failed.log(i)}")
    if failed.step.resources.world_size > 1:
        lines.append(f"         (other ranks: {failed.log(i).name.replace('_0_log', '_<rank>_log')})")
    if down:
        lines.append("  cancelled the jobs that depend on it: "
                     + ", ".join(f"{s.step.key} ({s.job_id})" for s in down))
    print("\n".join(lines), file=sys.stderr, flush=True)


def wait(subs: list[Submitted], poll_s: float) -> int:
    """Follow the jobs until all completed (0) or one failed (1: says which and where its log is)."""
    shown: dict[str, str] = {}
    while True:
        states = job_states(subs)
        for s in subs:
            for i, job in enumerate(s.jobs):
                state = states[job.job_id]
                if shown.get(job.job_id, "UNKNOWN") != state:  # UNKNOWN: not in sacct yet
                    shown[job.job_id] = state
                    print(f"{time.strftime('%H:%M:%S')} {s.label(i):<32} job {job.job_id:<10} {state}", flush=True)
        for s in subs:  # the first failure in submission order is the cause, later ones follow from it
            for i, job in enumerate(s.jobs):
                if states[job.job_id] not in WAITING and states[job.job_id] != "COMPLETED":
                    report_failure(subs, s, i, states[job.job_id])
                    return 1
        if all(v == "COMPLETED" for v in states.values()):
            return 0
        time.sleep(poll_s)


# -- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("pipeline", "sweep"))
    p.add_argument("--preset", default="quick", help="smoke | quick | seed (default: quick)")
    p.add_argument("--wait", action="store_true", help="follow the jobs; exit 1 naming the stage that failed")
    p.add_argument("--hold", action="store_true", help="submit the chain held (start it with scontrol release)")
    p.add_argument("--stages", default="all", help="pipeline only: comma-separated subset of "
                   f"{','.join(PIPELINE_STEPS)} (train-student = both students); default all")
    p.add_argument("--poll-s", type=float, default=10.0, help="--wait: seconds between sacct calls")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p.parse_intermixed_args(argv)


def plan(args: argparse.Namespace) -> tuple[Config, list[Step]]:
    overrides, grid = split_grid(expand_wildcards(args.overrides))
    if args.command == "pipeline" and grid:
        raise ConfigError(f"{', '.join(grid)}: several values are for `sweep`, not `pipeline`")
    if args.command == "sweep" and not grid:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2,... (e.g. kd.alpha=0.1,0.5,0.9)")
    if args.command == "sweep" and args.stages != "all":
        raise ConfigError("--stages is for `pipeline` only")
    # Absolute run dir: the record and the logs name it, and symlinks are made relative to it.
    overrides.append(f"run.dir={load_config(args.preset, overrides).run_dir.resolve()}")
    cfg = load_config(args.preset, overrides)
    if args.command == "pipeline":
        return cfg, pipeline_steps(cfg, parse_stages(args.stages))
    return cfg, sweep_steps(args.preset, overrides, grid)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, steps = plan(args)
        log_dir = Path(cfg.slurm.log_dir or cfg.run_dir / "slurm").resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        subs = submit(steps, log_dir, hold=args.hold)
    except (ConfigError, SubmissionError, OSError) as e:  # OSError: the log or run dir is not writable
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 2
    record = write_record(args.command, cfg, subs, log_dir)
    print_submission(subs, record, args.hold)
    if not args.wait:
        return 0
    try:
        rc = wait(subs, args.poll_s)
    except KeyboardInterrupt:
        print("launch.slurm: stopped waiting; the jobs keep running", file=sys.stderr)
        return 130
    if rc == 0:
        print(f"{args.command} finished: report in {cfg.run_dir / 'report' / 'report.md'}", flush=True)
    return rc


if __name__ == "__main__":
    # Run the importable module, not __main__: submitit pickles StageJob by reference, and a
    # class of __main__ could not be found again inside the job.
    from launch.slurm import main as _main

    sys.exit(_main())
