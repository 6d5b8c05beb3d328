"""What runs inside a Slurm job: the submitit callables that run one kd_ddp stage in each task.

submitit pickles a `StageJob` at submission (by reference to this module, which the job's
Python imports again) and calls it in every task of the job. Inside a job, every Slurm task
is one torch.distributed rank: submitit's `TorchDistributedEnvironment` exports RANK,
WORLD_SIZE, MASTER_ADDR, ... and `run_stage` joins the group exactly as under torchrun;
MASTER_PORT is picked free on the first node by the job script (launch/ports.py). Jobs are
checkpointable: on USR2 (preemption, or `slurm.signal_delay_s` before the time limit)
submitit requeues them, and the stage resumes from its last epoch checkpoint.

Also here: reading a task's result file without running what it names (`read_outcome`),
which the watcher in launch/slurm.py uses to say why a job failed.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import socket
import sys
from pathlib import Path
from typing import Any

import submitit

from kd_ddp import stages
from kd_ddp.checkpoint import atomic_write_bytes, atomic_write_json
from kd_ddp.config import Config, ConfigError, from_dict
from kd_ddp.stages import Stage


class StageJob(submitit.helpers.Checkpointable):
    """One kd_ddp stage in one Slurm task; all tasks of the job form one process group.

    It names its stage as `run_stage` takes it, a CLI command, its mode and (a task of an
    ensemble's teacher array) its member, under the attribute names jobs have always been
    pickled with: a job queued (or requeued) before an upgrade is loaded and called by this
    code; one pickled before `member` existed has none, and reads as member 0 (every teacher).
    """

    def __init__(self, config: dict[str, Any], stage: str, mode: str = "kd", gpus: int = 0,
                 member: int = 0) -> None:
        self.config = config
        self.stage = stage  # the CLI command of the stage (stages.Stage.command)
        self.mode = mode  # train-student's --mode; ignored by the other commands
        self.gpus = gpus  # GPUs the job asked for on each node; > 0 means train on them or fail
        self.member = member  # train-teacher --member: the ensemble's teacher it trains alone; 0 = none

    @property
    def task_member(self) -> int:
        """The member, 0 for a job pickled before there were members."""
        return getattr(self, "member", 0)

    @property
    def runs(self) -> Stage:
        """The stage this job runs (a member's, for a task of an ensemble's teacher array)."""
        if self.task_member:
            return stages.teacher_member(self.task_member)
        n = self.config.get("kd", {}).get("ensemble", 0) if isinstance(self.config, dict) else 0
        return stages.of_command(self.stage, self.mode, n)[0]

    @property
    def label(self) -> str:
        """How its log lines name it: the command, and a member's stage (`train-teacher [teacher-2]`)."""
        return f"{self.stage} [{self.runs.name}]" if self.task_member else self.stage

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
        print(f"kd-ddp {self.label}: rank {dist.rank} of world size {dist.world_size} on {socket.gethostname()} "
              f"(local rank {dist.local_rank} of {dist.local_world_size}, "
              f"master {dist.master_addr}:{dist.master_port})", flush=True)
        cfg = from_dict(self.config)
        check_node(cfg, self.runs, self.gpus)
        try:
            result = run_stage(cfg, self.stage, self.mode, member=self.task_member)
            if joined_a_group():
                atexit.register(end_once_saved, submitit.JobEnvironment().paths.result_pickle)
            return result
        except Preempted as e:
            # SIGTERM: Slurm is ending the job (requeue, preemption, cancel) and the stage has
            # checkpointed mid-epoch. Leave without a result, so submitit records no failure.
            print(f"kd-ddp {self.label}: {e}", flush=True)
            raise SystemExit(143) from None
        finally:
            print(f"kd-ddp {self.label}: rank {dist.rank} ran on CPUs {sorted(os.sched_getaffinity(0))} with "
                  f"{torch_threads()} torch threads", flush=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Nothing to save here: every epoch already ends with an atomic checkpoint that
        # run_stage resumes from, so requeueing the same call loses at most one epoch.
        print(f"kd-ddp {self.label}: interrupted; requeueing, the stage resumes from its last "
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
        super().__init__(config, stages.REPORT.command)
        self.points = points  # name -> run dir

    def __call__(self) -> dict[str, Any]:
        result = super().__call__()
        kd = stages.STUDENT_KD.name
        missing = [n for n, d in self.points.items() if not (Path(d) / kd / "summary.json").is_file()]
        note_missing_points(Path(self.config["run"]["dir"]) / stages.REPORT.name, missing)
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


def check_node(cfg: Config, stage: Stage, gpus: int) -> None:
    """Refuse, naming the stage and the node, what would otherwise fail late or silently: a
    job that asked for GPUs but sees none (it would train for hours on the CPU), FFCV that
    does not import where data.loader=ffcv needs it (a traceback when the loader starts).
    The messages name the stage by its command, as the job's log lines do."""
    import torch

    from kd_ddp.distributed import cuda_visibility

    host = socket.gethostname()
    if gpus and not torch.cuda.is_available():
        raise ConfigError(f"stage {stage.command}: the job asked Slurm for {gpus} GPU(s) per node "
                          f"(slurm.{stage.resources}) but torch sees no CUDA device on {host} ({cuda_visibility()}); "
                          "check the GPU request for this partition, and that the job's Python has a CUDA "
                          "build of torch")
    if cfg.data.loader == "ffcv" and stage != stages.REPORT:  # the report reads no data
        try:
            import ffcv  # noqa: F401
        except Exception as e:
            raise ConfigError(f"stage {stage.command}: data.loader=ffcv but FFCV does not import on {host} "
                              f"({sys.executable}: {type(e).__name__}: {e}); install kd-ddp[ffcv] in the "
                              "job's environment or use data.loader=torch") from None
