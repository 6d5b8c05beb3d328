"""Submit the pipeline to Slurm with submitit: one job per stage, chained with dependencies.

    python -m launch.slurm pipeline --preset P [--wait] [--hold] [--stages S,..] [section.field=value ...]
    python -m launch.slurm sweep    --preset P [--wait] kd.alpha=0.1,0.5 kd.temperature=2,4 seed=0,1
    python -m launch.slurm status   RECORD|RUN_DIR [--wait]

`pipeline`: prepare-data -> train-teacher -> cache-logits -> {student-normal, student-kd} -> report;
with an ensemble (kd.ensemble=N) the teachers are one job array of N tasks (`train-teacher
--member i` each), which the cache job waits for as a whole, and student-kd-ensemble is a third student.
`sweep`: the same head (one teacher, a logits cache per seed), then every point of the grid as
one job array of KD students in `<run.dir>/sweep/<name>/`, beside one normal student, and a
report that runs once they all ended (afterany) and names the points that did not finish.
`status`: re-attach to a submitted chain through its record: the state of every stage, and
with --wait, follow it as the submitting command would have.
Per-stage resources come from the `slurm.*` config section (`slurm.teacher.tasks_per_node=2`;
`slurm.*.field=value` sets a field for every stage); docs/slurm.md says what each becomes.

This module is the submitter and the watcher: it turns the plan (launch/plan.py: which jobs,
with which configs and dependencies) into sbatch submissions of the jobs that run on the
nodes (launch/tasks.py), writes the record, and follows the jobs' states through sacct and
squeue, cancelling what a failure leaves unable to run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from kd_ddp.checkpoint import atomic_write_json
from kd_ddp.config import Config, ConfigError, StageResources
from kd_ddp.stages import REPORT, STUDENT_KD

# The `as` imports keep here the names other code imported from this module before it was
# split: the pickle of a job submitted before names launch.slurm.StageJob (or SweepReportJob),
# which submitit loads again when the job starts or is requeued; tests and benchmarks import
# the others.
from launch.plan import STEPS, Step, log_dir_of, plan_submission
from launch.plan import check_paths as check_paths
from launch.plan import link as link
from launch.tasks import StageJob, SweepReportJob, read_outcome
from launch.tasks import end_once_saved as end_once_saved

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("pipeline", "sweep", "status")  # this launcher's, not kd_ddp's
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


def stage_job(step: Step, cfg: Config, task: int = 0) -> StageJob:
    """The job of task `task` of a step (0 for a plain job): a teacher array's trains its member."""
    gpus = step.resources.gpus_on_node()
    if step.points:
        return SweepReportJob(job_config(cfg, gpus), step.points)
    member = step.members[task] if step.members else 0
    return StageJob(job_config(cfg, gpus), step.stage.command, step.mode, gpus, member)


def submit_step(step: Step, log_dir: Path, after_ok: list[str], after_any: list[str], hold: bool
                ) -> list[submitit.SlurmJob]:
    ex = executor(step, log_dir, after_ok, after_any, hold)
    if not step.names:
        return [ex.submit(stage_job(step, step.configs[0]))]
    with ex.batch():  # one job array
        jobs = [ex.submit(stage_job(step, c, i)) for i, c in enumerate(step.configs)]
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
            raise SubmissionError(f"submitting {step.key} (slurm.{step.stage.resources}) failed, nothing is "
                                  f"left queued:\n{str(e).strip()}") from None
        raise
    return list(done.values())


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False, timeout=60)


def report_of(run_dir: Path) -> Path:
    return run_dir / REPORT.name / "report.md"


def write_record(kind: str, cfg: Config, subs: list[Submitted], log_dir: Path) -> Path:
    """A JSON record of the submission: job ids, dependencies and logs; `status` re-attaches
    to the chain through it."""
    record = {
        "kind": kind, "preset": cfg.preset, "run_dir": str(cfg.run_dir), "log_dir": str(log_dir),
        "report": str(report_of(cfg.run_dir)),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # "stage": the job's command, as records have named it since before kd_ddp.stages
        "jobs": [{"key": s.step.key, "stage": s.step.stage.command, "mode": s.step.mode, "job_id": s.job_id,
                  "depends_on": s.depends_on, "depends_on_any": s.depends_on_any,
                  "after": s.step.after, "after_any": s.step.after_any, "log": str(s.log(0)),
                  "tasks": s.step.resources.world_size,
                  "array": [array_task(s, i) for i in range(len(s.step.names))]}
                 for s in subs],
    }
    path = log_dir / f"{kind}-{subs[0].job_id}.json"
    atomic_write_json(path, record)  # whoever polls for it never reads half of it
    return path


def array_task(s: Submitted, i: int) -> dict[str, Any]:
    """The record of one task of an array: its name (a sweep point, or a teacher member's stage),
    job id, log and run dir; a teacher member's number and stage dir too."""
    task = {"name": s.step.names[i], "job_id": s.jobs[i].job_id, "log": str(s.log(i)),
            "run_dir": str(s.step.configs[i].run_dir)}
    if s.step.members:
        task |= {"member": s.step.members[i], "stage_dir": str(s.step.configs[i].run_dir / s.step.names[i])}
    return task


def print_submission(subs: list[Submitted], record: Path, hold: bool) -> None:
    for s in subs:
        deps = dependency(s.depends_on, s.depends_on_any) or "-"
        res = s.step.resources
        shape = f"{res.nodes}x{res.tasks_per_node} task(s)"
        what = f"array of {len(s.jobs)}" if s.step.names else shape
        print(f"{s.step.key:<24} job {s.job_id:<10} {deps:<28} {what:<16} log {s.log(0)}")
        for i, name in enumerate(s.step.names):
            where = (f"member {s.step.members[i]}, dir {s.step.configs[i].run_dir / name}" if s.step.members
                     else f"run {s.step.configs[i].run_dir}")
            print(f"  {name:<22} job {s.jobs[i].job_id:<10} {where}")
    print(f"record: {record}  (follow it later: python -m launch.slurm status {record} --wait)")
    if hold:
        held = [s.job_id for s in subs if not (s.depends_on or s.depends_on_any)]
        print(f"held: start the chain with `scontrol release {' '.join(held)}`")
    print(f"cancel: scancel {' '.join(s.job_id for s in subs)}", flush=True)


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
    report = Path(record.get("report") or report_of(Path(record["run_dir"])))
    not_done = [label for label, state in states.items() if state != "COMPLETED"]
    if not not_done:
        print(f"{record['kind']} finished: report in {report}", flush=True)
        return 0
    report_state = states.get(REPORT.step)
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
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--preset", default="quick", help="smoke | quick | seed (default: quick)")
    p.add_argument("--wait", action="store_true", help="follow the jobs; exit 1 naming the stage that failed")
    p.add_argument("--hold", action="store_true", help="submit the chain held (start it with scontrol release)")
    p.add_argument("--stages", default="all", help="pipeline only: comma-separated subset of "
                   f"{','.join(STEPS)} ({STUDENT_KD.command} = every student; an ensemble's teachers are one "
                   "array, train-teacher); default all")
    p.add_argument("--poll-s", type=float, default=10.0, help="--wait: seconds between sacct calls")
    p.add_argument("--pending-notice-s", type=float, default=300.0,
                   help="--wait: print why a job is pending once it has been for this long (default 300)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides; for status: the record (or the run dir)")
    return p.parse_intermixed_args(argv)


def plan(args: argparse.Namespace) -> tuple[Config, list[Step]]:
    return plan_submission(args.command, args.preset, args.stages, args.overrides, warn=print_warning)


def print_warning(text: str) -> None:
    print(f"launch.slurm: warning: {text}", file=sys.stderr)


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
