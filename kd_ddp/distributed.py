"""torch.distributed set-up shared by torchrun and Slurm tasks (both export RANK etc.)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from kd_ddp.config import Config, ConfigError

log = logging.getLogger(__name__)

# Set once this process has joined a process group (see end_process).
_JOINED = False
# Work that must happen before end_process's os._exit, which skips atexit (see at_end_process).
_END_HOOKS: list[Callable[[int], None]] = []
# The longest end_process waits for its hooks: a hung one (a W&B service that does not
# answer) must not keep a finished rank, and torchrun with it, from ending.
END_HOOKS_TIMEOUT_S = 180.0


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    # torchrun of one process still joins a process group (see setup)
    group_of_one: bool = False
    backend: str = "none"  # of the process group: nccl | gloo | none
    cpus: int = 1  # CPUs this rank may use (rank_cpus): its torch threads and FFCV workers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives run (and the model is wrapped in DDP)."""
        return self.world_size > 1 or self.group_of_one


def available_cores() -> int:
    """The CPUs this process may run on. os.sched_getaffinity, not psutil's cpu_affinity: the
    same call, with no dependency (psutil is used where it adds something, kd_ddp/doctor.py)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rank_cpus(local_world_size: int) -> int:
    """The CPUs one rank may use. Ranks that torchrun (or a hand-made launch) starts share the
    affinity mask of their launcher and split it. A Slurm task is one rank (launch/tasks.py):
    its mask is its own, cpus_per_task CPUs under task/affinity; under task/none it is the
    whole node, so SLURM_CPUS_PER_TASK caps it."""
    cores = available_cores()
    in_slurm_step = "SLURM_STEP_ID" in os.environ and "SLURM_CPUS_PER_TASK" in os.environ
    if in_slurm_step:
        cores = min(cores, int(os.environ["SLURM_CPUS_PER_TASK"]))
    if in_slurm_step and "TORCHELASTIC_RUN_ID" not in os.environ:
        return max(1, cores)
    return max(1, cores // local_world_size)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device=cuda but no CUDA device is visible ({cuda_visibility()})")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cuda_visibility() -> str:
    """Why torch may see no GPU: its build and what the scheduler exposed."""
    build = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                                else "a CPU-only build")
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
    exposed = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return f"{build}; {', '.join(exposed) or 'CUDA_VISIBLE_DEVICES not set'}"


def import_ffcv_first(cfg: Config, device: torch.device) -> None:
    """Importing FFCV sets torch's threads to 1 (ffcv/pipeline/compiler.py, at import time):
    when its loader may be used, import it before the threads are chosen, so that they stay
    chosen. (FFCV's loaders set torch's threads to data.num_workers, which is the same number
    unless that field is set.) A run whose loader cannot be FFCV's (`torch`, `device`, and
    `auto` on a GPU, where the data is held on the device) does not import it at all; should
    `auto` still pick FFCV there (data too large for the GPU), kd_ddp.data imports it then,
    keeping the thread count."""
    if available_cores() == 1:
        # FFCV's numba with its default TBB threading layer hangs at interpreter exit in a
        # process bound to one CPU (a Slurm task of cpus_per_task=1, taskset -c 0) once its
        # DatasetWriter has run; numba's own workqueue layer does not. numba reads this when
        # it is imported.
        os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    if cfg.data.loader in ("torch", "device") or (cfg.data.loader == "auto" and device.type == "cuda"):
        return
    # Not installed, or a build that does not load: the loaders say so when they need it.
    with contextlib.suppress(Exception):
        import ffcv  # noqa: F401


def setup(cfg: Config) -> DistEnv:
    """Join the process group described by the environment (a no-op for one process)."""
    global _JOINED
    env = DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    env.device = pick_device(cfg.train.device, env.local_rank)
    # Ranks sharing a node must split its cores, or they thrash each other.
    env.cpus = rank_cpus(env.local_world_size)
    import_ffcv_first(cfg, env.device)
    torch.set_num_threads(cfg.train.threads or env.cpus)
    # One rank trains group-free, under torchrun too, unless train.one_rank_ddp asks for the
    # NCCL + DDP path of a multi-GPU job over a group of one (`--nproc_per_node=1` on one GPU).
    env.group_of_one = env.world_size == 1 and "TORCHELASTIC_RUN_ID" in os.environ and cfg.train.one_rank_ddp
    if env.distributed and not dist.is_initialized():
        if cfg.optim.batch_size % env.world_size:
            raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by "
                              f"the world size {env.world_size}")
        backend = env.backend = "nccl" if env.device.type == "cuda" else "gloo"
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        timeout = datetime.timedelta(minutes=60)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across elastic restarts: without a per-attempt prefix a
        # restarted group reads the dead workers' gloo addresses and fails to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _JOINED = True
        dist.init_process_group(backend, store=dist.PrefixStore(f"kd_ddp/attempt{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout,
                                device_id=env.device if backend == "nccl" else None)
    return env


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def joined_a_group() -> bool:
    return _JOINED


def at_end_process(hook: Callable[[int], None]) -> None:
    """Run `hook(exit_code)` in end_process, before os._exit: the place for clean-up that
    would otherwise have run in an atexit handler (tracking finishes its W&B runs there)."""
    if hook not in _END_HOOKS:
        _END_HOOKS.append(hook)


def _run_end_hooks(code: int) -> None:
    """The end hooks, last registered first (as atexit), each one's failure a warning. They
    run in the main thread (wandb expects its calls there); a watchdog thread ends the
    process if they outlast END_HOOKS_TIMEOUT_S."""
    watchdog = threading.Timer(END_HOOKS_TIMEOUT_S, _overdue, (code, END_HOOKS_TIMEOUT_S))
    watchdog.daemon = True
    watchdog.start()
    for hook in reversed(_END_HOOKS):
        try:
            hook(code)
        except BaseException as e:  # SystemExit too: wandb.teardown raises it for a failed service
            log.warning("clean-up at exit (%s) failed: %s: %s", getattr(hook, "__qualname__", hook),
                        type(e).__name__, e)
    watchdog.cancel()


def _flush_and_exit(code: int) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _overdue(code: int, timeout_s: float) -> None:
    log.warning("clean-up at exit still running after %.0f s; ending the process without it", timeout_s)
    _flush_and_exit(code)


def end_process(code: int) -> NoReturn:
    """End a process that was in a process group, after teardown, without the interpreter's
    and C++ runtime's exit-time clean-up. With torch 2.14, a DistributedDataParallel model
    keeps its gloo group alive after destroy_process_group (its threads survive it); that
    group is then destroyed during interpreter exit, where it can abort ("terminate called
    without an active exception", SIGABRT): ~1 exit in 5 of two ranks on a busy 2-core
    machine, and torchrun reports a finished run as failed. os._exit also skips the atexit
    handlers, wandb's among them (it finishes open runs and flushes them), so the hooks of
    at_end_process run first; then stdio and logging are flushed."""
    try:
        if _END_HOOKS:
            _run_end_hooks(code)
    finally:  # a Ctrl-C during the clean-up still ends the process with its code
        _flush_and_exit(code)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum floats over ranks (float64 so sums of per-sample losses stay exact enough)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: object, env: DistEnv) -> object:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place, where it lives (a GPU tensor stays on the GPU: NCCL
    queues the sum behind the step, the host does not wait for it). A group of one (torchrun
    with one process) has nothing to sum: no collective is launched."""
    if env.distributed and env.world_size > 1:
        dist.all_reduce(t)
    return t


def all_gather_object(obj: object, env: DistEnv) -> list[object]:
    """Every rank's `obj`, in rank order (one element without a process group)."""
    if not env.distributed:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


T = TypeVar("T")


def main_does(work: Callable[[], T], env: DistEnv, known: tuple[type[Exception], ...],
              fallback: Callable[[str], Exception]) -> T:
    """Rank 0 does `work` and every rank gets its result, or raises its error: an error of a
    `known` type as that type with rank 0's message, any other as `fallback(description)`.
    No rank is left waiting in a collective for a rank 0 that gave up (the pattern of the data
    preparation and of the logits cache's lock). Rank 0 itself raises the original error."""
    result: Any = None
    if env.is_main:
        try:
            result = work()
        except BaseException as e:
            if env.distributed:  # the other ranks raise it too, then rank 0 raises the original
                broadcast_object((None, type(e).__name__, str(e)), env)
            raise
    result, kind, message = broadcast_object((result, "", ""), env)  # type: ignore[misc]
    if kind:
        by_name = {k.__name__: k for k in known}
        raise by_name[kind](message) if kind in by_name else fallback(f"{kind}: {message}")
    return result  # type: ignore[no-any-return]
